"""The simulator's and router's shortcuts change cost, never behaviour.

Shared message encodings must give the codec's exact bytes, the decode memo must
leave a run unchanged, the cached P6 terms must follow peers coming and going, and
the per-heartbeat IHAVE budget must still start afresh on every heartbeat.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest

from meshmerge.daemon.gossip.adversary import build_swarm
from meshmerge.daemon.gossip.frames import FrameEncoder
from meshmerge.daemon.gossip.params import PeerScoreParams, TopicScoreParams, derive_score_params
from meshmerge.daemon.gossip.router import GossipSubRouter
from meshmerge.daemon.gossip.score import PeerScore
from meshmerge.daemon.gossip.sim import Network, Simulator
from meshmerge.proto.gossipsub import (
    RPC,
    ControlGraft,
    ControlIDontWant,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    Message,
    PeerInfo,
    SubOpts,
    encode_frame,
)
from meshmerge.proto.gossipsub_sign import Ed25519Identity


def _msg(i: int, size: int) -> Message:
    return Message(
        from_peer=bytes([i]) * 38,
        data=bytes([i]) * size,
        seqno=i.to_bytes(8, "big"),
        topic=f"t{i % 3}",
        signature=b"s" * 64,
        key=None if i % 2 else b"k" * 36,
    )


def test_shared_message_encoding_is_byte_identical_to_the_codec() -> None:
    rng = random.Random(1)
    msgs = [_msg(i, size) for i, size in enumerate([0, 1, 127, 128, 300, 20000])]
    encoder = FrameEncoder()
    rpcs = [
        RPC(),
        RPC(subscriptions=[SubOpts(True, "a"), SubOpts(False, "b"), SubOpts(None, None)]),
        RPC(control=ControlMessage()),
        RPC(
            subscriptions=[SubOpts(True, "x")],
            publish=[msgs[1], msgs[5], msgs[1]],
            control=ControlMessage(
                ihave=[ControlIHave("t", [b"a" * 20, b"b" * 200])],
                iwant=[ControlIWant([b"c"])],
                graft=[ControlGraft("t"), ControlGraft(None)],
                prune=[ControlPrune("t", [PeerInfo(b"p", b"r" * 300)], 60), ControlPrune(None)],
                idontwant=[ControlIDontWant([b"d" * 32])],
            ),
        ),
    ]
    for _ in range(50):  # the same Message objects shared by many RPCs, as in a flush
        rpcs.append(RPC(publish=rng.sample(msgs, rng.randint(1, len(msgs)))))
    for rpc in rpcs:
        assert encoder.encode(rpc) == encode_frame(rpc)
    assert encoder.hits > 0  # shared messages were spliced, not re-encoded


def _run(decode_cache: int) -> Simulator:
    sp, th = derive_score_params({"t": 1.0})
    sim = Simulator(Network(latency=(0.01, 0.05)), seed=7, decode_cache=decode_cache)
    swarm = build_swarm(30, 30, sim=sim, score_params=sp, thresholds=th, seed=7)
    rng = random.Random(7)
    for k in range(15):
        node = rng.choice(swarm.honest)
        sim.call_at(2.0 + k, lambda node=node, k=k: sim.publish(node, "t", k.to_bytes(4, "big") * 50))
    sim.run_until(25.0)
    return sim


def test_decode_memo_leaves_the_run_unchanged() -> None:
    plain, memo = _run(0), _run(4096)
    assert plain.decodes == plain.frames > 0
    assert memo.decodes < memo.frames == plain.frames
    assert memo.delivered == plain.delivered
    assert memo.bytes == plain.bytes
    for a, b in zip(plain.nodes, memo.nodes, strict=True):
        assert a.router is not None and b.router is not None
        assert a.router.mesh == b.router.mesh
        assert {p: a.router.peer_score(p) for p in a.router.peers} == {
            p: b.router.peer_score(p) for p in b.router.peers
        }


def test_cached_ip_colocation_terms_follow_peers_leaving() -> None:
    params = PeerScoreParams(
        topics={"t": TopicScoreParams()},
        ip_colocation_factor_weight=-1.0,
        ip_colocation_factor_threshold=1,
        retain_score=10.0,
    )
    ps = PeerScore(params)
    peers = [bytes([i]) for i in range(4)]
    for p in peers:
        ps.add_peer(p, ["192.0.2.9"])
    assert ps.score(peers[0]) == pytest.approx(-9.0)  # 4 on the IP, threshold 1 → 3²
    ps.remove_peer(peers[3], now=0.0)  # negative score: retained, still counted on the IP
    assert ps.score(peers[0]) == pytest.approx(-9.0)
    ps.tick(11.0)  # retention over: forgotten, and the IP's surplus shrinks
    assert ps.known_peers() == 3
    assert ps.score(peers[0]) == pytest.approx(-4.0)
    ps.set_ips(peers[1], ["198.51.100.1"])
    ps.set_ips(peers[2], ["198.51.100.2"])
    assert ps.score(peers[0]) == 0.0


def test_ihave_budget_restarts_on_every_heartbeat() -> None:
    r = GossipSubRouter(Ed25519Identity(bytes(32)), rng=random.Random(0))
    attacker = b"\x01" * 38
    r.add_peer(attacker, "/meshsub/1.2.0", False, "192.0.2.1", 0.0)
    r.subscribe("t", 0.0)
    limit = r.params.max_ihave_messages

    def spam(now: float) -> int:
        before = r.stats.ihave_ignored
        for k in range(limit + 5):
            ids = [bytes([k, j]) * 10 for j in range(2)]
            r.on_rpc(attacker, RPC(control=ControlMessage(ihave=[ControlIHave("t", ids)])), now)
        return r.stats.ihave_ignored - before

    assert spam(0.1) == 5
    r.on_heartbeat(1.0)
    assert spam(1.1) == 5  # a fresh budget, not an exhausted one


class _HeapQueue:
    """The plain (time, insertion) heap the calendar queue replaced: the reference order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def call_at(self, at: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, fn))

    def run_until(self, t_end: float) -> None:
        while self._heap and self._heap[0][0] <= t_end:
            at, _, fn = heapq.heappop(self._heap)
            self.now = at
            self.events += 1
            fn()
        self.now = max(self.now, t_end)


def _queue_trace(sim: Simulator | _HeapQueue) -> list[tuple[float, int, float]]:
    rng = random.Random(3)
    ran: list[tuple[float, int, float]] = []
    count = [0]

    def schedule(at: float) -> None:
        n = count[0]
        count[0] += 1

        def fn() -> None:
            ran.append((sim.now, n, at))
            if n < 3000 and rng.random() < 0.5:
                # from inside an event: the same time, the same 1 ms bucket, the past, later
                schedule(rng.choice([sim.now, sim.now + 1e-4, sim.now - 0.5, sim.now + rng.random() * 3]))

        sim.call_at(at, fn)

    for t in [rng.random() * 5 for _ in range(500)] + [1.0] * 20 + [2.0005] * 5 + [-0.25]:
        schedule(t)
    for stop in (0.5, 1.0, 1.0, 2.0004, 2.0005, 7.0, 100.0):
        sim.run_until(stop)
        ran.append((sim.now, -1, stop))
    assert sim.events == count[0]
    return ran


def test_calendar_queue_runs_events_in_the_plain_heap_order() -> None:
    trace = _queue_trace(Simulator(seed=3))
    assert len(trace) > 1000
    assert trace == _queue_trace(_HeapQueue())


def test_signature_memo_rejects_forged_copies_and_leaves_the_run_unchanged() -> None:
    from meshmerge.daemon.gossip.sim import SignatureMemo
    from meshmerge.proto.gossipsub_sign import SignatureError, sign_message

    ident = Ed25519Identity(bytes(range(32)))
    good = sign_message(ident, Message(data=b"hello", seqno=b"\x00" * 8, topic="t"))
    memo = SignatureMemo(limit=4)
    memo.verify(good)
    memo.verify(Message(good.from_peer, good.data, good.seqno, good.topic, good.signature))
    assert (memo.checks, memo.hits) == (1, 1)
    for forged in (
        Message(good.from_peer, b"HELLO", good.seqno, good.topic, good.signature),
        Message(good.from_peer, good.data, good.seqno, good.topic, bytes(64)),
        Message(good.from_peer, good.data, b"\x00" * 7 + b"\x01", good.topic, good.signature),
    ):
        with pytest.raises(SignatureError):
            memo.verify(forged)
        with pytest.raises(SignatureError):  # failures are never remembered as passes
            memo.verify(forged)
    for i in range(10):  # bounded
        memo.verify(sign_message(ident, Message(data=bytes([i]), seqno=bytes(8), topic="t")))
        assert len(memo._ok) <= 4

    def run(signature_memo: int) -> Simulator:
        sp, th = derive_score_params({"t": 1.0})
        sim = Simulator(Network(latency=(0.01, 0.05)), seed=5, signature_memo=signature_memo)
        swarm = build_swarm(20, 10, sim=sim, score_params=sp, thresholds=th, seed=5)
        for k in range(8):
            sim.call_at(2.0 + k, lambda k=k: sim.publish(swarm.honest[k], "t", bytes([k]) * 100))
        sim.run_until(15.0)
        return sim

    plain, memo_run = run(0), run(65536)
    assert plain.signatures is None
    assert memo_run.signatures is not None and memo_run.signatures.hits > memo_run.signatures.checks > 0
    assert memo_run.delivered == plain.delivered and memo_run.frames == plain.frames
    for a, b in zip(plain.nodes, memo_run.nodes, strict=True):
        assert a.router is not None and b.router is not None
        assert a.router.stats == b.router.stats
        assert {p: a.router.peer_score(p) for p in a.router.peers} == {
            p: b.router.peer_score(p) for p in b.router.peers
        }


def test_one_ihave_object_shared_by_many_rpcs_is_encoded_once() -> None:
    ih = ControlIHave("t", [bytes([i]) * 20 for i in range(7)])
    rpcs = [
        RPC(control=ControlMessage(ihave=[ih])),
        RPC(control=ControlMessage(ihave=[ih], graft=[ControlGraft("t")])),
        RPC(
            subscriptions=[SubOpts(True, "t")],
            publish=[_msg(3, 50)],
            control=ControlMessage(
                ihave=[ControlIHave("u", [b"x" * 300]), ih],
                iwant=[ControlIWant([b"c"])],
                prune=[ControlPrune("t", [PeerInfo(b"p", b"r" * 200)], 60)],
                idontwant=[ControlIDontWant([b"d" * 32])],
            ),
        ),
        RPC(control=ControlMessage(ihave=[ControlIHave(None, [])])),
    ]
    enc = FrameEncoder()
    assert [enc.encode(r) for r in rpcs] == [encode_frame(r) for r in rpcs]
    assert enc.hits == 2  # ih encoded once, spliced twice more
