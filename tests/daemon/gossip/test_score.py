"""Peer score terms P1–P7, each against a hand computation."""

from __future__ import annotations

import ipaddress

import pytest

from meshmerge.daemon.gossip.params import PeerScoreParams, TopicScoreParams
from meshmerge.daemon.gossip.score import PeerScore, RejectReason

A, B, C = b"peer-a", b"peer-b", b"peer-c"
T = "t"


def topic(**kw: float) -> TopicScoreParams:
    base: dict[str, float] = {
        "topic_weight": 1.0,
        "time_in_mesh_quantum": 1.0,
        "first_message_deliveries_decay": 0.5,
        "mesh_message_deliveries_decay": 0.5,
        "mesh_failure_penalty_decay": 0.5,
        "invalid_message_deliveries_decay": 0.5,
        # a P3 term strong enough for validate()'s non-forwarder rule that never activates,
        # so each test sees only the term it exercises
        "mesh_message_deliveries_weight": -1e6,
        "mesh_message_deliveries_threshold": 1.0,
        "mesh_message_deliveries_cap": 1.0,
        "mesh_message_deliveries_activation": 1e9,
    }
    base.update(kw)
    return TopicScoreParams(**base)  # type: ignore[arg-type]


def make(tp: TopicScoreParams, **kw: object) -> PeerScore:
    ps = PeerScore(PeerScoreParams(topics={T: tp}, **kw))  # type: ignore[arg-type]
    ps.add_peer(A, ["192.0.2.1"])
    return ps


def tick_to(ps: PeerScore, t: float) -> None:
    ps.tick(t)


def test_p1_time_in_mesh_whole_quanta_capped() -> None:
    ps = make(topic(time_in_mesh_weight=0.5, time_in_mesh_quantum=2.0, time_in_mesh_cap=3.0))
    ps.graft(A, T, now=0.0)
    assert ps.score(A) == 0.0
    for t in range(1, 4):
        ps.tick(float(t))
    assert ps.score(A) == pytest.approx(0.5 * 1)  # floor(3 s / 2 s) = 1 quantum
    for t in range(4, 20):
        ps.tick(float(t))
    assert ps.score(A) == pytest.approx(0.5 * 3)  # capped at 3 quanta
    ps.prune(A, T)
    assert ps.score(A) == 0.0


def test_p2_first_deliveries_capped_and_decaying() -> None:
    ps = make(topic(first_message_deliveries_weight=2.0, first_message_deliveries_cap=3.0))
    for i in range(5):
        mid = bytes([i])
        ps.validate_message(mid, 0.0)
        ps.deliver_message(A, mid, T, 0.0)
    assert ps.score(A) == pytest.approx(2.0 * 3)  # capped
    ps.tick(1.0)
    assert ps.score(A) == pytest.approx(2.0 * 1.5)  # decay 0.5
    for t in range(2, 12):
        ps.tick(float(t))
    assert ps.score(A) == 0.0  # decayed below decay_to_zero (0.01) → exactly 0


def p3_params(**kw: float) -> TopicScoreParams:
    args: dict[str, float] = {
        "mesh_message_deliveries_weight": -1.0,
        "mesh_message_deliveries_threshold": 4.0,
        "mesh_message_deliveries_cap": 10.0,
        "mesh_message_deliveries_activation": 5.0,
        "mesh_message_deliveries_window": 0.5,
        "mesh_message_deliveries_decay": 0.9,
        "mesh_failure_penalty_weight": -2.0,
        "mesh_failure_penalty_decay": 0.5,
    }
    args.update(kw)
    return topic(**args)


def test_p3_deficit_squared_only_after_activation() -> None:
    ps = make(p3_params())
    ps.graft(A, T, now=0.0)
    ps.validate_message(b"m1", 0.0)
    ps.deliver_message(A, b"m1", T, 0.0)  # first delivery counts for P3 too
    for t in range(1, 6):
        ps.tick(float(t))
    assert ps.score(A) == 0.0  # mesh time 5 s is not > activation 5 s
    ps.tick(6.0)
    deliveries = 1.0 * 0.9**6
    assert ps.score(A) == pytest.approx(-((4.0 - deliveries) ** 2))


def test_p3_near_first_window_and_during_validation() -> None:
    ps = make(p3_params())
    ps.add_peer(B)
    ps.add_peer(C)
    for p in (A, B, C):
        ps.graft(p, T, now=0.0)
    ps.validate_message(b"m", 10.0)
    ps.duplicate_message(B, b"m", T, 10.1)  # arrives while validating: credited on delivery
    ps.deliver_message(A, b"m", T, 10.2)
    ps.duplicate_message(C, b"m", T, 10.8)  # 0.6 s after validation: outside the 0.5 s window
    ps.duplicate_message(B, b"m", T, 10.3)  # already counted once
    assert ps.topic_counters(A, T)["mesh_deliveries"] == 1.0
    assert ps.topic_counters(B, T)["mesh_deliveries"] == 1.0
    assert ps.topic_counters(C, T)["mesh_deliveries"] == 0.0
    assert ps.topic_counters(B, T)["first_deliveries"] == 0.0


def test_p3b_sticky_failure_penalty_on_prune() -> None:
    ps = make(p3_params())
    ps.graft(A, T, now=0.0)
    for t in range(1, 7):
        ps.tick(float(t))
    ps.prune(A, T)
    # P3b = deficit² = 16 at weight -2; as in go, P3 (-1 · 4²) stays active until the next GRAFT
    assert ps.score(A) == pytest.approx(-2.0 * 16.0 - 16.0)
    ps.tick(7.0)
    assert ps.score(A) == pytest.approx(-2.0 * 8.0 - 16.0)  # P3b decays by 0.5
    ps.graft(A, T, now=7.0)
    assert ps.score(A) == pytest.approx(-2.0 * 8.0)


def test_p4_invalid_squared_and_reject_reasons() -> None:
    ps = make(topic(invalid_message_deliveries_weight=-3.0))
    ps.add_peer(B)
    ps.validate_message(b"x", 0.0)
    ps.duplicate_message(B, b"x", T, 0.0)  # B forwarded it during validation
    ps.reject_message(A, b"x", T, RejectReason.VALIDATION_FAILED, 0.0)
    assert ps.score(A) == pytest.approx(-3.0) and ps.score(B) == pytest.approx(-3.0)
    ps.reject_message(A, b"y", T, RejectReason.INVALID_SIGNATURE, 0.0)
    assert ps.score(A) == pytest.approx(-3.0 * 4)  # 2 invalid → 2²
    ps.reject_message(A, b"z", T, RejectReason.VALIDATION_IGNORED, 0.0)
    ps.duplicate_message(B, b"z", T, 0.0)
    ps.reject_message(A, b"q", T, RejectReason.VALIDATION_QUEUE_FULL, 0.0)
    assert ps.score(A) == pytest.approx(-12.0) and ps.score(B) == pytest.approx(-3.0)
    ps.duplicate_message(C, b"x", T, 0.0)  # unknown peer: ignored
    ps.tick(1.0)
    assert ps.score(A) == pytest.approx(-3.0 * 1.0)  # 2 · 0.5 = 1 → 1²


def test_topic_weight_and_cap() -> None:
    tp = topic(topic_weight=0.5, first_message_deliveries_weight=10.0, first_message_deliveries_cap=100.0)
    ps = make(tp, topic_score_cap=20.0)
    for i in range(3):
        ps.deliver_message(A, bytes([i]), T, 0.0)
    assert ps.score(A) == pytest.approx(15.0)  # 3 · 10 · 0.5
    ps.deliver_message(A, b"4", T, 0.0)
    assert ps.score(A) == pytest.approx(20.0)  # capped


def test_p5_application_score_hook() -> None:
    opinion = {A: -7.0}
    ps = make(topic(), app_specific_score=lambda p: opinion.get(p, 0.0), app_specific_weight=2.0)
    assert ps.score(A) == -14.0
    opinion[A] = 1.0
    ps.invalidate(A)
    assert ps.score(A) == 2.0


def test_p6_ip_colocation_surplus_squared_with_whitelist() -> None:
    params = {"ip_colocation_factor_weight": -1.0, "ip_colocation_factor_threshold": 2}
    ps = make(topic(), **params)
    for i in range(4):
        ps.add_peer(bytes([i]), ["192.0.2.1"])
    assert ps.score(A) == pytest.approx(-9.0)  # 5 peers on the IP, threshold 2 → 3²
    ps.set_ips(A, ["198.51.100.7"])
    assert ps.score(A) == 0.0 and ps.score(b"\x00") == pytest.approx(-4.0)
    wl = make(topic(), ip_colocation_factor_whitelist=(ipaddress.ip_network("192.0.2.0/24"),), **params)
    for i in range(4):
        wl.add_peer(bytes([i]), ["192.0.2.1"])
    assert wl.score(A) == 0.0


def test_p7_behaviour_penalty_above_threshold() -> None:
    ps = make(
        topic(), behaviour_penalty_weight=-1.0, behaviour_penalty_threshold=2.0, behaviour_penalty_decay=0.5
    )
    ps.add_penalty(A, 2)
    assert ps.score(A) == 0.0
    ps.add_penalty(A, 3)
    assert ps.score(A) == pytest.approx(-9.0)  # (5 − 2)²
    ps.tick(1.0)
    assert ps.score(A) == pytest.approx(-0.25)  # (2.5 − 2)²


def test_retention_after_disconnect() -> None:
    ps = make(
        topic(
            invalid_message_deliveries_weight=-1.0,
            first_message_deliveries_weight=1.0,
            first_message_deliveries_cap=10.0,
        ),
        retain_score=30.0,
    )
    ps.reject_message(A, b"x", T, RejectReason.INVALID_SIGNATURE, 0.0)
    ps.remove_peer(A, now=0.5)
    for t in range(1, 20):
        ps.tick(float(t))
    assert ps.score(A) == pytest.approx(-1.0)  # retained and not decayed while away
    ps.add_peer(A)
    assert ps.score(A) == pytest.approx(-1.0)  # reconnecting does not wash it
    ps.remove_peer(A, now=20.0)
    for t in range(21, 52):
        ps.tick(float(t))
    assert ps.known_peers() == 0  # retention expired
    ps.add_peer(B)
    ps.deliver_message(B, b"m", T, 0.0)
    ps.remove_peer(B, now=52.0)
    assert ps.known_peers() == 0  # positive scores are not retained


def test_delivery_records_are_garbage_collected() -> None:
    ps = PeerScore(PeerScoreParams(topics={T: topic()}), delivery_record_ttl=10.0)
    for i in range(1000):
        ps.validate_message(i.to_bytes(4, "big"), float(i) / 100)
    ps.tick(25.0)
    assert ps.delivery_records() == 0
