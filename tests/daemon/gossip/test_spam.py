"""go-libp2p-pubsub's spam scenarios, replayed on the simulator with a scripted raw attacker.

Each test checks the defence (penalty, graylist, limit) *and* that the victim's state and
work stay bounded while the attack runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from meshmerge.daemon.gossip.adversary import build_swarm
from meshmerge.daemon.gossip.params import GossipSubParams, derive_score_params
from meshmerge.daemon.gossip.router import GossipSubRouter, Validation
from meshmerge.daemon.gossip.sim import SimNode, Simulator
from meshmerge.proto.gossipsub import (
    RPC,
    ControlGraft,
    ControlIDontWant,
    ControlIHave,
    ControlIWant,
    ControlMessage,
    ControlPrune,
    Message,
    SubOpts,
)
from meshmerge.proto.gossipsub_sign import Ed25519Identity, sign_message

T = "t"


@dataclass
class Setup:
    sim: Simulator
    victim: SimNode
    router: GossipSubRouter
    attacker: SimNode
    ident: Ed25519Identity
    others: list[SimNode]


def setup(seed: int = 1, validator: object = None, subscribe_attacker: bool = True) -> Setup:
    sp, th = derive_score_params({T: 1.0})
    sim = Simulator(seed=seed)
    swarm = build_swarm(6, sim=sim, score_params=sp, thresholds=th, seed=seed, honest_degree=4)
    victim = swarm.honest[0]
    assert victim.router is not None
    if validator is not None:
        victim.router.validator = validator  # type: ignore[assignment]
    ident = Ed25519Identity(bytes([seed]) * 32)
    attacker = sim.add_node(None, peer_id=ident.peer_id, ip="100.96.0.1", honest=False)
    sim.connect(attacker, victim)
    if subscribe_attacker:
        sim.inject(attacker, victim, RPC(subscriptions=[SubOpts(True, T)]))
    sim.run_until(2.0)
    return Setup(sim, victim, victim.router, attacker, ident, swarm.honest[1:])


def received(s: Setup) -> list[RPC]:
    return [rpc for _, _, rpc in s.attacker.inbox]


def test_iwant_spam_is_answered_at_most_gossip_retransmission_times() -> None:
    s = setup()
    mid = s.sim.publish(s.victim, T, b"hello")
    s.sim.run_until(2.5)
    base = sum(len(r.publish) for r in received(s))
    bogus = [random.Random(1).randbytes(40) for _ in range(2000)]
    for k in range(100):
        s.sim.inject(
            s.attacker,
            s.victim,
            RPC(control=ControlMessage(iwant=[ControlIWant([mid, *bogus])])),
            at=2.5 + k * 0.01,
        )
    s.sim.run_until(4.0)
    copies = sum(1 for r in received(s) for m in r.publish if m.data == b"hello") - base
    assert copies <= s.router.params.gossip_retransmission
    assert len(s.router.mcache) <= 2  # nothing stored for unknown ids
    assert sum(len(v) for v in s.router.mcache._requests.values()) <= 1


def test_ihave_spam_is_capped_and_broken_promises_end_in_the_gossip_threshold() -> None:
    s = setup()
    rng = random.Random(2)
    p = s.router.params
    for hb in range(50):
        # per heartbeat: 3 × 3000 fresh ids (over MaxIHaveLength) and 12 small IHAVEs (over MaxIHaveMessages)
        for k in range(15):
            ids = [rng.randbytes(16) for _ in range(3000 if k < 3 else 10)]
            ihave = RPC(control=ControlMessage(ihave=[ControlIHave(T, ids)]))
            s.sim.inject(s.attacker, s.victim, ihave, at=2.0 + hb + k * 0.02)
    asked: dict[int, int] = {}
    s.sim.run_until(60.0)
    for at, _, rpc in s.attacker.inbox:
        if rpc.control:
            asked[int(at)] = asked.get(int(at), 0) + sum(len(w.message_ids) for w in rpc.control.iwant)
    assert (
        max(asked.values()) <= p.max_ihave_length + p.max_ihave_length // 5
    )  # heartbeat phase straddles seconds
    assert len(s.router.promises) <= 60  # one promise per IWANT
    assert s.router.peer_score(s.attacker.peer_id) < s.router.thresholds.gossip_threshold
    before = sum(asked.values())
    ignored = s.router.stats.ihave_ignored + s.router.stats.rpcs_graylisted
    s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(ihave=[ControlIHave(T, [b"x" * 16])])))
    s.sim.run_until(61.0)
    assert s.router.stats.ihave_ignored + s.router.stats.rpcs_graylisted > ignored
    assert (
        sum(len(w.message_ids) for _, _, r in s.attacker.inbox if r.control for w in r.control.iwant)
        == before
    )


def test_graft_for_unknown_topics_changes_nothing() -> None:
    s = setup()
    r = s.router
    sizes = (len(r.mesh), len(r.topics), len(r.backoff), len(r.fanout))
    grafts = [ControlGraft(f"nope-{i}") for i in range(4000)]
    for k in range(20):
        s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(graft=grafts)), at=2.0 + k * 0.1)
    s.sim.run_until(10.0)
    assert (len(r.mesh), len(r.topics), len(r.backoff), len(r.fanout)) == sizes
    assert r.stats.graft_unknown_topic == 20 * 4000
    assert not any(rpc.control and rpc.control.prune for rpc in received(s))


def test_graft_during_backoff_grows_p7_until_graylisted() -> None:
    s = setup()
    r = s.router
    s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(graft=[ControlGraft(T)])))
    s.sim.run_until(3.0)
    assert s.attacker.peer_id in r.mesh[T]
    # leave with a PRUNE, then GRAFT again and again inside the backoff
    s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(prune=[ControlPrune(T, [], 60)])))
    for k in range(60):
        s.sim.inject(
            s.attacker, s.victim, RPC(control=ControlMessage(graft=[ControlGraft(T)])), at=3.2 + k * 0.5
        )
    penalties = []
    for t in range(4, 34):
        s.sim.run_until(float(t))
        penalties.append(r.score.behaviour_penalty(s.attacker.peer_id))  # type: ignore[union-attr]
        assert s.attacker.peer_id not in r.mesh[T]
    assert penalties[5] > penalties[0] > 0
    assert r.peer_score(s.attacker.peer_id) < r.thresholds.graylist_threshold
    assert r.stats.rpcs_graylisted > 0
    assert r.stats.graft_backoff_violations >= 10
    assert len(r.backoff[T]) <= len(r.peers)


def _bad_sig(ident: Ed25519Identity, k: int) -> Message:
    m = sign_message(ident, Message(data=b"spam%d" % k, seqno=k.to_bytes(8, "big"), topic=T))
    assert m.signature is not None
    return Message(m.from_peer, m.data, m.seqno, m.topic, bytes(64))


def test_invalid_message_spam_hits_p4_and_graylist_and_honest_traffic_flows() -> None:
    s = setup(
        validator=lambda topic, msg, peer: (
            Validation.REJECT if (msg.data or b"").startswith(b"bad") else Validation.ACCEPT
        )
    )
    r = s.router
    for k in range(20):  # bad signatures: P4 = 20² at weight -50 → -20000, below the graylist
        s.sim.inject(s.attacker, s.victim, RPC(publish=[_bad_sig(s.ident, k)]), at=2.0 + k * 0.02)
    s.sim.run_until(2.9)
    # the 18th invalid message crosses the graylist (18² · 50 > 16000): the rest are not even parsed
    assert r.stats.messages_invalid_signature == 18 and r.stats.rpcs_graylisted == 2
    assert r.score.topic_counters(s.attacker.peer_id, T)["invalid_deliveries"] == pytest.approx(18, rel=0.01)  # type: ignore[union-attr]
    assert r.peer_score(s.attacker.peer_id) < r.thresholds.graylist_threshold
    # properly signed but rejected by the validator: ignored now (graylisted), so no new work
    for k in range(200):
        msg = sign_message(s.ident, Message(data=b"bad%d" % k, seqno=(1000 + k).to_bytes(8, "big"), topic=T))
        s.sim.inject(s.attacker, s.victim, RPC(publish=[msg]), at=3.0 + k * 0.01)
    honest = [s.sim.publish(s.others[i % 5], T, b"ok%d" % i) for i in range(5)]
    s.sim.run_until(8.0)
    assert r.stats.rpcs_graylisted >= 200
    assert all(m.data and not m.data.startswith(b"bad") for m in r.mcache._msgs.values())
    assert all(s.victim.index in s.sim.delivered[m] for m in honest)


def test_validator_reject_penalises_p4_before_graylisting() -> None:
    s = setup(validator=lambda topic, msg, peer: Validation.REJECT)
    for k in range(3):
        msg = sign_message(s.ident, Message(data=b"x", seqno=k.to_bytes(8, "big"), topic=T))
        s.sim.inject(s.attacker, s.victim, RPC(publish=[msg]))
    s.sim.run_until(3.0)
    counters = s.router.score.topic_counters(s.attacker.peer_id, T)  # type: ignore[union-attr]
    assert counters["invalid_deliveries"] == pytest.approx(3, rel=0.01)
    assert s.router.peer_score(s.attacker.peer_id) < 0


def test_idontwant_spam_is_bounded() -> None:
    s = setup()
    r = s.router
    p = r.params
    rng = random.Random(3)
    for hb in range(5):
        for k in range(1500):
            ids = [rng.randbytes(20) for _ in range(50)]
            s.sim.inject(
                s.attacker,
                s.victim,
                RPC(control=ControlMessage(idontwant=[ControlIDontWant(ids)])),
                at=2.0 + hb + k / 2000,
            )
    peak = 0
    for t in range(3, 12):
        s.sim.run_until(float(t))
        peak = max(peak, len(r.peers[s.attacker.peer_id].dontwant))
    assert peak <= p.max_idontwant_messages * p.max_idontwant_length * (p.idontwant_message_ttl + 1)
    assert r.stats.idontwant_ignored > 0
    assert len(r.peers[s.attacker.peer_id].dontwant) == 0  # all expired once the spam stops


def test_idontwant_is_sent_for_large_messages_only_and_honoured() -> None:
    s = setup()
    r = s.router
    s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(graft=[ControlGraft(T)])))
    s.sim.run_until(3.0)
    assert s.attacker.peer_id in r.mesh[T]
    small = s.sim.publish(s.others[0], T, b"s" * 100)
    big = s.sim.publish(s.others[1], T, b"b" * (r.params.idontwant_message_threshold + 10))
    s.sim.run_until(5.0)
    idw = [m for rpc in received(s) if rpc.control for d in rpc.control.idontwant for m in d.message_ids]
    got = [m.data for rpc in received(s) for m in rpc.publish]
    assert s.victim.index in s.sim.delivered[big] and s.victim.index in s.sim.delivered[small]
    assert idw == [big]  # the victim told its mesh peers it has the large one
    # the attacker (a mesh peer) says it does not want the next large message: the victim skips it
    nxt = s.others[2].router.peer_id + (s.others[2].router._seqno + 1).to_bytes(8, "big")  # type: ignore[union-attr]
    s.sim.inject(s.attacker, s.victim, RPC(control=ControlMessage(idontwant=[ControlIDontWant([nxt])])))
    s.sim.run_until(5.1)
    assert s.sim.publish(s.others[2], T, b"c" * 2000) == nxt
    s.sim.run_until(7.0)
    assert s.victim.index in s.sim.delivered[nxt]
    after = [m.data for rpc in received(s) for m in rpc.publish]
    assert b"c" * 2000 not in after[len(got) :]


def test_slow_peer_is_disconnected_not_buffered() -> None:
    params = GossipSubParams(max_peer_queue_messages=32, max_peer_queue_bytes=1 << 20)
    r = GossipSubRouter(Ed25519Identity(bytes(32)), params=params, rng=random.Random(0))
    slow = Ed25519Identity(bytes([1]) * 32).peer_id
    r.add_peer(slow, "/meshsub/1.2.0", True, "100.64.0.9")
    r.on_rpc(slow, RPC(subscriptions=[SubOpts(True, T)]), 0.0)
    r.subscribe(T, 0.0)
    for k in range(100):
        r.publish(T, b"m" * 1000, 0.1 + k * 0.001)
        assert r.queued_bytes(slow) <= params.max_peer_queue_bytes
    assert slow in r.take_disconnects()
    assert r.stats.slow_peer_disconnects >= 1


def test_async_validation_is_bounded_per_peer() -> None:
    params = GossipSubParams(max_pending_validations_per_peer=16)
    r = GossipSubRouter(
        Ed25519Identity(bytes(32)), params=params, validator=lambda t, m, p: None, rng=random.Random(0)
    )
    ident = Ed25519Identity(bytes([7]) * 32)
    r.add_peer(ident.peer_id, "/meshsub/1.2.0", False, "100.64.0.7")
    r.subscribe(T, 0.0)
    msgs = [sign_message(ident, Message(data=b"d", seqno=k.to_bytes(8, "big"), topic=T)) for k in range(100)]
    r.on_rpc(ident.peer_id, RPC(publish=msgs), 1.0)
    pend = r.take_validations()
    assert len(pend) == 16 and len(r.pending) == 16
    assert r.stats.messages_throttled == 84
    for pv in pend:
        r.report_validation(pv.mid, Validation.ACCEPT, 1.5)
    assert len(r.take_deliveries()) == 16 and not r.pending
    # unanswered validations expire instead of piling up
    r.on_rpc(ident.peer_id, RPC(publish=msgs[16:20]), 2.0)
    assert len(r.pending) == 4
    for t in range(3, 200):
        r.on_heartbeat(float(t))
    assert not r.pending
