"""Lattice laws and convergence of MergeState, on generated states and deliveries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from meshmerge.crdt import MergeState, digest_of_tensors
from meshmerge.proto.cbor import encode
from meshmerge.proto.messages import StateMessage, loads_state
from tests.crdt.factories import schema, signer
from tests.crdt.pool import EQUIVOCATOR, POOL, observable

OPS = POOL.ops()
op_subsets = st.lists(st.sampled_from(range(len(OPS))), max_size=len(OPS))


def build(indices: list[int]) -> MergeState:
    s = MergeState(schema())
    for i in indices:
        s.apply(OPS[i])
    return s


def join(a: MergeState, b: MergeState) -> MergeState:
    out = MergeState(schema())
    out.apply(a.full_state())
    out.apply(b.full_state())
    return out


@given(op_subsets, op_subsets)
def test_join_is_commutative(x: list[int], y: list[int]) -> None:
    a, b = build(x), build(y)
    assert observable(join(a, b)) == observable(join(b, a))


@given(op_subsets, op_subsets, op_subsets)
def test_join_is_associative(x: list[int], y: list[int], z: list[int]) -> None:
    a, b, c = build(x), build(y), build(z)
    assert observable(join(join(a, b), c)) == observable(join(a, join(b, c)))


@given(op_subsets)
def test_join_is_idempotent(x: list[int]) -> None:
    a = build(x)
    before = observable(a)
    a.apply(a.full_state())
    assert observable(a) == before
    assert observable(join(a, a)) == before


@given(op_subsets, st.randoms(use_true_random=False))
def test_delta_join_equals_full_join(x: list[int], rnd) -> None:  # type: ignore[no-untyped-def]
    source = build(x)
    by_delta = MergeState(schema())
    shuffled = list(x)
    rnd.shuffle(shuffled)
    for i in shuffled:
        by_delta.apply(OPS[i])
    assert observable(by_delta) == observable(join(MergeState(schema()), source))


@given(op_subsets)
def test_live_set_is_adds_minus_removals_minus_convicted(x: list[int]) -> None:
    s = build(x)
    present = [OPS[i] for i in set(x)]
    adds = {a.id: a for m in present for a in m.adds}
    removed = {(r.target, d) for m in present for r in m.removals for d in r.dots}
    dots: dict[tuple[bytes, int], set[bytes]] = {}
    for cid, a in adds.items():
        dots.setdefault(a.header.dot, set()).add(cid)
    convicted = {dot[0] for dot, ids in dots.items() if len(ids) > 1}
    convicted |= {e.author for m in present for e in m.evidence}
    expected = sorted(
        cid
        for cid, a in adds.items()
        if (cid, a.header.dot) not in removed and a.header.author not in convicted
    )
    assert s.live_ids() == expected
    assert s.orset.convicted() == convicted
    assert convicted <= {signer(EQUIVOCATOR).peer_id}


class Replicas(RuleBasedStateMachine):
    """K replicas; ops issued at random replicas travel as deltas that the network
    reorders, duplicates and drops; periodic full-state exchange repairs losses."""

    K = 3

    @initialize()
    def setup(self) -> None:
        self.replicas = [MergeState(schema()) for _ in range(self.K)]
        self.in_flight: list[tuple[int, bytes]] = []
        self.issued: set[int] = set()

    @rule(op=st.sampled_from(range(len(OPS))), at=st.integers(0, K - 1))
    def issue(self, op: int, at: int) -> None:
        report = self.replicas[at].apply(OPS[op])
        self.issued.add(op)
        if report.new_ops is not None:
            wire = encode(report.new_ops.to_obj())
            self.in_flight += [(to, wire) for to in range(self.K) if to != at]

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data(), duplicate=st.booleans())
    def deliver(self, data: st.DataObject, duplicate: bool) -> None:
        i = data.draw(st.integers(0, len(self.in_flight) - 1))
        to, wire = self.in_flight[i] if duplicate else self.in_flight.pop(i)
        report = self.replicas[to].apply(loads_state(wire))
        assert not report.rejected

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @rule(a=st.integers(0, K - 1), b=st.integers(0, K - 1))
    def anti_entropy(self, a: int, b: int) -> None:
        wire = encode(self.replicas[a].full_state().to_obj())
        self.replicas[b].apply(loads_state(wire))

    @invariant()
    def quiescence_converges(self) -> None:
        """Deliver everything still in flight and exchange full states: all agree."""
        probe = [MergeState(schema()) for _ in range(self.K)]
        for p, r in zip(probe, self.replicas, strict=True):
            p.apply(r.full_state())
        for p in probe:
            for q in self.replicas:
                p.apply(q.full_state())
        views = {observable(p) for p in probe}
        assert len(views) == 1
        if probe[0].live_ids():
            digests = {digest_of_tensors(p.merged(POOL.blobs.get)) for p in probe}
            assert len(digests) == 1
        merged_all = MergeState(schema())
        for i in self.issued:
            merged_all.apply(OPS[i])
        assert observable(merged_all) == observable(probe[0])


TestReplicas = Replicas.TestCase
TestReplicas.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


def test_state_message_with_mixed_good_and_bad_ops_keeps_the_good() -> None:
    s = MergeState(schema())
    good = POOL.adds[0]
    bad = type(good)(good.header, bytes(64))
    report = s.apply(StateMessage(good.header.set_id, adds=(bad, good)))
    assert report.added == [good.id]
    assert len(report.rejected) == 1
