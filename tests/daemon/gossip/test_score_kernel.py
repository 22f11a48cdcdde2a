"""The compiled score counters and decay loop (meshmerge.cext.gossip_score) agree with
the score formulas written out in Python here, bit for bit, over random event histories."""

from __future__ import annotations

import math
import random

import pytest

from meshmerge.daemon.gossip.params import PeerScoreParams, TopicScoreParams, derive_score_params
from meshmerge.daemon.gossip.score import PeerScore, RejectReason

TOPICS = ("a", "b")


def reference_topic_score(c: dict[str, float | bool], tp: TopicScoreParams) -> float:
    """topic_weight · (w1·P1 + w2·P2 + w3·P3 + w3b·P3b + w4·P4), as the v1.1 spec / go define it."""
    topic_score = 0.0
    if c["in_mesh"]:
        p1 = float(math.floor(float(c["mesh_time"]) / tp.time_in_mesh_quantum))
        if p1 > tp.time_in_mesh_cap:
            p1 = tp.time_in_mesh_cap
        topic_score += p1 * tp.time_in_mesh_weight
    topic_score += float(c["first_deliveries"]) * tp.first_message_deliveries_weight
    mesh = float(c["mesh_deliveries"])
    if c["mesh_deliveries_active"] and mesh < tp.mesh_message_deliveries_threshold:
        deficit = tp.mesh_message_deliveries_threshold - mesh
        topic_score += deficit * deficit * tp.mesh_message_deliveries_weight
    topic_score += float(c["mesh_failure_penalty"]) * tp.mesh_failure_penalty_weight
    invalid = float(c["invalid_deliveries"])
    topic_score += invalid * invalid * tp.invalid_message_deliveries_weight
    return topic_score * tp.topic_weight


def reference_score(ps: PeerScore, peer: bytes, ips: tuple[str, ...], peer_ips: dict[str, int]) -> float:
    p = ps.params
    score = 0.0
    for t in TOPICS:
        c = ps.topic_counters(peer, t)
        if c:
            score += reference_topic_score(c, p.topics[t])
    if p.topic_score_cap > 0 and score > p.topic_score_cap:
        score = p.topic_score_cap
    if p.app_specific_weight != 0:
        score += p.app_specific_score(peer) * p.app_specific_weight
    if p.ip_colocation_factor_weight != 0:
        for ip in ips:
            surplus = peer_ips[ip] - p.ip_colocation_factor_threshold
            if surplus > 0:
                score += float(surplus * surplus) * p.ip_colocation_factor_weight
    excess = ps.behaviour_penalty(peer) - p.behaviour_penalty_threshold
    if excess > 0:
        score += excess * excess * p.behaviour_penalty_weight
    return score


def reference_decay(
    c: dict[str, float | bool], tp: TopicScoreParams, dz: float, now: float, graft: float
) -> dict[str, float | bool]:
    out = dict(c)
    for name, decay in (
        ("first_deliveries", tp.first_message_deliveries_decay),
        ("mesh_deliveries", tp.mesh_message_deliveries_decay),
        ("mesh_failure_penalty", tp.mesh_failure_penalty_decay),
        ("invalid_deliveries", tp.invalid_message_deliveries_decay),
    ):
        x = float(c[name]) * decay
        out[name] = 0.0 if x < dz else x
    if c["in_mesh"]:
        out["mesh_time"] = now - graft
        if out["mesh_time"] > tp.mesh_message_deliveries_activation:  # type: ignore[operator]
            out["mesh_deliveries_active"] = True
    return out


def _params(kind: int) -> PeerScoreParams:
    if kind == 0:
        sp, _ = derive_score_params({t: 1.0 + i for i, t in enumerate(TOPICS)})
        return sp
    tps = {
        t: TopicScoreParams(
            topic_weight=0.5 + i,
            time_in_mesh_weight=0.0277,
            time_in_mesh_quantum=0.7,
            time_in_mesh_cap=7.5,
            first_message_deliveries_weight=1.3,
            first_message_deliveries_decay=0.9,
            first_message_deliveries_cap=9,  # an int cap: counters must still match exactly
            mesh_message_deliveries_weight=-3.1,
            mesh_message_deliveries_decay=0.8,
            mesh_message_deliveries_cap=11.0,
            mesh_message_deliveries_threshold=4.0,
            mesh_message_deliveries_window=0.05,
            mesh_message_deliveries_activation=2.5,
            mesh_failure_penalty_weight=-0.9,
            mesh_failure_penalty_decay=0.7,
            invalid_message_deliveries_weight=-7.0,
            invalid_message_deliveries_decay=0.6,
        )
        for i, t in enumerate(TOPICS)
    }
    return PeerScoreParams(
        topics=tps,
        topic_score_cap=12.0 if kind == 1 else 0.0,
        app_specific_weight=0.3,
        app_specific_score=lambda peer: float(peer[0] % 5) - 2.0,
        ip_colocation_factor_weight=-2.5,
        ip_colocation_factor_threshold=2,
        behaviour_penalty_weight=-1.7,
        behaviour_penalty_threshold=1.5,
        behaviour_penalty_decay=0.85,
        decay_interval=1.0,
        decay_to_zero=0.01,
        retain_score=5.0,
    )


@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_scores_equal_the_python_formulas_bit_for_bit(kind: int, seed: int) -> None:
    rng = random.Random(seed)
    params = _params(kind)
    ps = PeerScore(params)
    peers = [bytes([i]) + b"-peer" for i in range(12)]
    ips = {p: (f"192.0.2.{rng.randrange(4)}",) for p in peers}
    connected: set[bytes] = set()
    grafted: dict[tuple[bytes, str], float] = {}
    now = 0.0
    mids = [bytes([k]) * 8 for k in range(60)]
    checked = 0
    for _ in range(1500):
        now += rng.random() * 0.2
        peer = rng.choice(peers)
        topic = rng.choice(TOPICS)
        mid = rng.choice(mids)
        op = rng.randrange(11)
        if op == 0 or peer not in connected:
            ps.add_peer(peer, ips[peer], now)
            connected.add(peer)
        elif op == 1:
            ps.graft(peer, topic, now)
            grafted[(peer, topic)] = now
        elif op == 2:
            ps.prune(peer, topic)
        elif op == 3:
            ps.validate_message(mid, now)
        elif op == 4:
            ps.deliver_message(peer, mid, topic, now)
        elif op == 5:
            ps.duplicate_message(peer, mid, topic, now)
        elif op == 6:
            ps.reject_message(
                peer,
                mid,
                topic,
                rng.choice([RejectReason.VALIDATION_FAILED, RejectReason.INVALID_SIGNATURE]),
                now,
            )
        elif op == 7:
            ps.add_penalty(peer, rng.randint(1, 3))
        elif op == 8 and rng.random() < 0.1:
            ps.remove_peer(peer, now)
            connected.discard(peer)
        else:
            # one decay interval: counters must follow the Python decay exactly, and the
            # scores the decay pass cached must equal the formulas (and the lazy path)
            before = {
                (p, t): ps.topic_counters(p, t) for p in connected for t in TOPICS if ps.topic_counters(p, t)
            }
            now = max(now, ps._next_decay)
            intervals, due = 0, ps._next_decay
            while now >= due:  # every interval elapsed since the last tick decays once
                intervals += 1
                due += params.decay_interval
            assert ps.tick(now)
            for (p, t), c in before.items():
                expect = c
                for _ in range(intervals):
                    expect = reference_decay(
                        expect, params.topics[t], params.decay_to_zero, now, grafted.get((p, t), 0.0)
                    )
                assert ps.topic_counters(p, t) == expect
            per_ip: dict[str, int] = {}
            for p in ps._peers:
                for ip in ps._peers[p].ips:
                    per_ip[ip] = per_ip.get(ip, 0) + 1
            for p in connected:
                cached = ps.score(p)
                assert cached == reference_score(ps, p, ips[p], per_ip)
                ps.invalidate(p)
                assert ps.score(p) == cached  # lazy (compiled) path agrees with the decay pass
                checked += 1
    assert checked > 200
