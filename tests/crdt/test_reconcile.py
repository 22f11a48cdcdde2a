"""Bucket-digest reconciliation: differing buckets are exactly where the op sets differ."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.crdt import MergeState
from meshmerge.crdt import reconcile as rc
from meshmerge.proto.messages import StateMessage
from tests.crdt.factories import schema
from tests.crdt.pool import POOL, observable


def replica(ops: list[StateMessage]) -> MergeState:
    s = MergeState(schema())
    for op in ops:
        s.apply(op)
    return s


def test_bits_grow_with_the_state_and_are_bounded() -> None:
    assert rc.choose_bits(0) == 0 and rc.choose_bits(rc.TARGET_PER_BUCKET) == 0
    assert rc.choose_bits(rc.TARGET_PER_BUCKET + 1) == 1
    assert rc.choose_bits(10**9) == rc.MAX_BITS
    with pytest.raises(ValueError, match="bits must be in"):
        rc.digests(replica([]), rc.MAX_BITS + 1)


def test_buckets_take_the_top_bits_of_the_digest() -> None:
    key = bytes(4) + bytes([0b10110000, 0xFF]) + bytes(30)
    assert [rc.bucket_of(key, b) for b in (0, 1, 2, 4, 12)] == [0, 1, 2, 11, 0xB0F]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_pulling_the_differing_buckets_converges(data: st.DataObject) -> None:
    ops = POOL.ops()
    mine_idx = data.draw(st.sets(st.integers(0, len(ops) - 1)))
    theirs_idx = data.draw(st.sets(st.integers(0, len(ops) - 1)))
    bits = data.draw(st.integers(0, 4))
    mine = replica([ops[i] for i in sorted(mine_idx)])
    theirs = replica([ops[i] for i in sorted(theirs_idx)])
    wanted = rc.differing(rc.digests(mine, bits), rc.digests(theirs, bits))
    delta = rc.ops_in(theirs, wanted, bits)
    report = mine.apply(delta)
    both = replica([ops[i] for i in sorted(mine_idx | theirs_idx)])
    assert observable(mine) == observable(both)
    # nothing from a bucket that already matched was sent
    sent = [a.id for a in delta.adds] + [r.key for r in delta.removals] + [e.key for e in delta.evidence]
    assert {rc.bucket_of(k, bits) for k in sent} <= set(wanted)
    if theirs_idx <= mine_idx:
        # a digest says "differs", not who lacks what: such a pull only brings duplicates
        assert report.new_ops is None


def test_one_missing_op_pulls_one_bucket() -> None:
    ops = POOL.ops()
    full = replica(ops)
    bits = 3
    for missing in range(len(ops)):
        partial = replica(ops[:missing] + ops[missing + 1 :])
        wanted = rc.differing(rc.digests(partial, bits), rc.digests(full, bits))
        if rc.op_count(partial) == rc.op_count(full):
            assert wanted == []  # the op was a duplicate of another message's content
            continue
        assert len(wanted) == 1
        delta = rc.ops_in(full, wanted, bits)
        assert rc.op_count(replica([delta])) < rc.op_count(full) or bits == 0
        partial.apply(delta)
        assert observable(partial) == observable(full)


def test_digest_cache_answers_until_the_state_grows() -> None:
    ops = POOL.ops()
    state = replica(ops[:3])
    cache = rc.DigestCache()
    bits = 2
    assert cache.get(state, bits) is None
    counts, keys = rc.op_counts(state), rc.op_keys(state)
    cache.put(state, bits, counts, rc.digests_of(keys, bits))
    assert cache.get(state, bits) == rc.digests(state, bits)
    assert cache.get(state, bits + 1) is None, "entries are per bucket count"
    for op in ops[3:]:
        state.apply(op)
        if rc.op_counts(state) != counts:
            break
    assert cache.get(state, bits) is None, "a grown state is hashed again"


def test_a_digest_snapshot_ignores_later_growth() -> None:
    """The key snapshot hashed off the event loop is the state at the time it was taken."""
    ops = POOL.ops()
    state = replica(ops[:3])
    keys = rc.op_keys(state)
    before = rc.digests(state, 1)
    for op in ops[3:]:
        state.apply(op)
    assert rc.digests_of(keys, 1) == before


def test_digest_cache_never_answers_for_another_state_of_the_set() -> None:
    """A set left and rejoined starts a new state: equal counts prove nothing about it."""
    ops = POOL.ops()
    first, again = replica(ops[:1]), replica(ops[1:2])
    assert rc.op_counts(first) == rc.op_counts(again) and rc.digests(first, 1) != rc.digests(again, 1)
    cache = rc.DigestCache()
    cache.put(first, 1, rc.op_counts(first), rc.digests(first, 1))
    assert cache.get(again, 1) is None
    cache.forget(first.set_id)
    assert cache.get(first, 1) is None
