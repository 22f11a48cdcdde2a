"""The simulator's and router's shortcuts change cost, never behaviour.

Shared message encodings must give the codec's exact bytes, the decode memo must
leave a run unchanged, the cached P6 terms must follow peers coming and going, and
the per-heartbeat IHAVE budget must still start afresh on every heartbeat.
"""

from __future__ import annotations

import random

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
