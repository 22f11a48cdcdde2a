"""Parameter validation: go-libp2p-pubsub's rules plus the non-forwarder rule."""

from __future__ import annotations

import dataclasses
import math

import pytest

from meshmerge.daemon.gossip.params import (
    GossipSubParams,
    ParamsError,
    PeerScoreParams,
    PeerScoreThresholds,
    TopicScoreParams,
    bootstrap_app_score,
    decay_convergence,
    derive_score_params,
    derive_topic_params,
    score_parameter_decay,
)

# Ethereum consensus beacon_block topic parameters (the set the formal analysis used;
# decays expressed per 1 s interval here, which does not change the attack)
ETH_BEACON_BLOCK = TopicScoreParams(
    topic_weight=0.5,
    time_in_mesh_weight=0.03333,
    time_in_mesh_quantum=12.0,
    time_in_mesh_cap=300.0,
    first_message_deliveries_weight=1.0,
    first_message_deliveries_decay=score_parameter_decay(20 * 384.0),
    first_message_deliveries_cap=23.0,
    mesh_message_deliveries_weight=-0.717,
    mesh_message_deliveries_decay=score_parameter_decay(5 * 384.0),
    mesh_message_deliveries_cap=139.0,
    mesh_message_deliveries_threshold=1.0,
    mesh_message_deliveries_window=2.0,
    mesh_message_deliveries_activation=384.0,
    mesh_failure_penalty_weight=-0.717,
    mesh_failure_penalty_decay=score_parameter_decay(5 * 384.0),
    invalid_message_deliveries_weight=-140.4475,
    invalid_message_deliveries_decay=score_parameter_decay(50 * 384.0),
)


def test_go_defaults() -> None:
    p = GossipSubParams()
    p.validate()
    assert (p.d, p.d_lo, p.d_hi, p.d_score, p.d_out, p.d_lazy) == (6, 5, 12, 4, 2, 6)
    assert (p.gossip_factor, p.history_length, p.history_gossip, p.heartbeat_interval) == (0.25, 5, 3, 1.0)
    assert (p.fanout_ttl, p.prune_backoff, p.unsubscribe_backoff) == (60.0, 60.0, 10.0)
    assert (p.opportunistic_graft_ticks, p.opportunistic_graft_peers) == (60, 2)
    assert (p.max_ihave_length, p.max_ihave_messages, p.iwant_followup_time) == (5000, 10, 3.0)
    assert (p.seen_ttl, p.max_message_size) == (120.0, 1 << 20)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"d_lo": 7}, "d_lo <= d <= d_hi"),
        ({"d_out": 5}, "d_out"),
        ({"gossip_factor": 1.5}, "gossip_factor"),
        ({"history_gossip": 6}, "history_gossip"),
        ({"heartbeat_interval": 0.0}, "heartbeat_interval"),
        ({"max_backoff": 5.0}, "max_backoff"),
        ({"fanout_ttl": math.nan}, "finite"),
    ],
)
def test_router_params_rules(change: dict[str, object], fragment: str) -> None:
    with pytest.raises(ParamsError, match=fragment):
        dataclasses.replace(GossipSubParams(), **change).validate()  # type: ignore[arg-type]


def test_threshold_ordering() -> None:
    PeerScoreThresholds(-10, -20, -30, 5, 1).validate()
    for bad, fragment in [
        (PeerScoreThresholds(gossip_threshold=1), "gossip_threshold"),
        (PeerScoreThresholds(-10, -5), "publish_threshold"),
        (PeerScoreThresholds(-10, -20, -15), "graylist_threshold"),
        (PeerScoreThresholds(accept_px_threshold=-1), "accept_px_threshold"),
        (PeerScoreThresholds(opportunistic_graft_threshold=-1), "opportunistic_graft"),
        (PeerScoreThresholds(gossip_threshold=-math.inf), "finite"),
    ]:
        with pytest.raises(ParamsError, match=fragment):
            bad.validate()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"topic_weight": -1.0}, "topic_weight"),
        ({"time_in_mesh_weight": -1.0}, "time_in_mesh_weight"),
        ({"time_in_mesh_quantum": 0.0}, "time_in_mesh_quantum"),
        ({"first_message_deliveries_weight": -1.0}, "first_message_deliveries_weight"),
        ({"first_message_deliveries_decay": 1.0}, "first_message_deliveries_decay"),
        ({"mesh_message_deliveries_weight": 1.0}, "mesh_message_deliveries_weight"),
        ({"mesh_message_deliveries_decay": 0.0}, "mesh_message_deliveries_decay"),
        ({"mesh_message_deliveries_threshold": 0.0}, "mesh_message_deliveries_threshold"),
        ({"mesh_message_deliveries_activation": 0.5}, "activation"),
        ({"mesh_failure_penalty_weight": 1.0}, "mesh_failure_penalty_weight"),
        ({"invalid_message_deliveries_weight": 1.0}, "invalid_message_deliveries_weight"),
        ({"invalid_message_deliveries_decay": 1.5}, "invalid_message_deliveries_decay"),
        ({"time_in_mesh_weight": math.inf}, "finite"),
    ],
)
def test_topic_param_rules(change: dict[str, object], fragment: str) -> None:
    good = derive_topic_params(1.0)
    good.validate("t")
    with pytest.raises(ParamsError, match=fragment):
        dataclasses.replace(good, **change).validate("t")  # type: ignore[arg-type]


def test_peer_param_rules() -> None:
    PeerScoreParams().validate()
    for change, fragment in [
        ({"topic_score_cap": -1.0}, "topic_score_cap"),
        ({"ip_colocation_factor_weight": 1.0}, "ip_colocation_factor_weight"),
        ({"ip_colocation_factor_weight": -1.0, "ip_colocation_factor_threshold": 0}, "threshold"),
        ({"behaviour_penalty_weight": 1.0}, "behaviour_penalty_weight"),
        ({"behaviour_penalty_weight": -1.0, "behaviour_penalty_decay": 1.0}, "behaviour_penalty_decay"),
        ({"behaviour_penalty_threshold": -1.0}, "behaviour_penalty_threshold"),
        ({"decay_interval": 0.5}, "decay_interval"),
        ({"decay_to_zero": 0.0}, "decay_to_zero"),
        ({"app_specific_weight": math.nan}, "finite"),
    ]:
        with pytest.raises(ParamsError, match=fragment):
            dataclasses.replace(PeerScoreParams(), **change).validate()  # type: ignore[arg-type]


def test_ethereum_parameters_are_refused_for_the_non_forwarder_weakness() -> None:
    # |w3|·thr² = 0.717 while w1·cap1 + w2·cap2 = 9.999 + 23
    assert ETH_BEACON_BLOCK.max_delivery_penalty() == pytest.approx(0.717)
    assert ETH_BEACON_BLOCK.max_reward() == pytest.approx(0.03333 * 300 + 23)
    with pytest.raises(ParamsError) as info:
        PeerScoreParams(topics={"beacon_block": ETH_BEACON_BLOCK}).validate()
    msg = str(info.value)
    assert "mesh_message_deliveries_weight" in msg and "never forwards" in msg and "ACL2s" in msg
    # equality is still refused: a non-forwarder would break even
    even = dataclasses.replace(
        ETH_BEACON_BLOCK, mesh_message_deliveries_weight=-ETH_BEACON_BLOCK.max_reward()
    )
    with pytest.raises(ParamsError):
        even.validate("t")
    dataclasses.replace(even, mesh_message_deliveries_weight=-1.01 * ETH_BEACON_BLOCK.max_reward()).validate(
        "t"
    )


def test_decay_helpers() -> None:
    d = score_parameter_decay(10.0)
    assert d**10 == pytest.approx(0.01)
    assert decay_convergence(0.5, 1.0) == 2.0
    with pytest.raises(ParamsError):
        score_parameter_decay(0.0)


@pytest.mark.parametrize("rate", [0.01, 0.5, 1.0, 20.0, 500.0])
def test_derived_params_validate_and_defeat_non_forwarders(rate: float) -> None:
    params, thresholds = derive_score_params({"a": rate, "b": rate / 3}, topic_weights={"b": 0.25})
    tp = params.topics["a"]
    assert tp.max_delivery_penalty() == pytest.approx(2.0 * tp.max_reward())
    assert tp.time_in_mesh_weight * tp.time_in_mesh_cap == pytest.approx(10.0)
    assert tp.first_message_deliveries_weight * tp.first_message_deliveries_cap == pytest.approx(40.0)
    assert params.topic_score_cap == pytest.approx((50 + 50 * 0.25) / 2)
    assert thresholds.graylist_threshold < thresholds.publish_threshold < thresholds.gossip_threshold < 0
    with pytest.raises(ParamsError, match="p3_margin"):
        derive_topic_params(rate, p3_margin=1.0)


def test_bootstrapper_params_have_no_mesh_and_do_px() -> None:
    p = GossipSubParams.bootstrapper()
    p.validate()
    assert (p.d, p.d_lo, p.d_hi, p.d_score, p.d_out, p.do_px) == (0, 0, 0, 0, 0, True)
    assert p.is_bootstrapper and not GossipSubParams().is_bootstrapper
    with pytest.raises(ParamsError, match="d_out must be 0 when d_hi = 0"):
        dataclasses.replace(p, d_out=1).validate()
    # a mesh of zero is only allowed as a whole: D_lo = 0 with D_hi > 0 still needs d_out < d_lo
    with pytest.raises(ParamsError, match="d_out"):
        dataclasses.replace(GossipSubParams(), d_lo=0, d_out=0, d=0).validate()


def test_accept_px_threshold_is_reachable_only_through_bootstrap_p5() -> None:
    boot, other = b"\x01boot", b"\x02other"
    params, th = derive_score_params({"a": 1.0}, bootstrappers=[boot])
    # topic behaviour is capped below the threshold, so only P5 can reach it
    assert params.topic_score_cap < th.accept_px_threshold
    assert th.accept_px_threshold == pytest.approx(2 * params.topic_score_cap)
    assert params.app_specific_weight * params.app_specific_score(boot) == pytest.approx(
        2 * th.accept_px_threshold
    )
    assert params.app_specific_score(other) == 0.0
    # composes with the application's own P5
    params2, _ = derive_score_params({"a": 1.0}, bootstrappers=[boot], app_specific_score=lambda p: -3.0)
    assert params2.app_specific_score(boot) == pytest.approx(2 * th.accept_px_threshold - 3.0)
    assert params2.app_specific_score(other) == -3.0
    with pytest.raises(ParamsError, match="non-empty peer id"):
        derive_score_params({"a": 1.0}, bootstrappers=[b""])
    with pytest.raises(ParamsError, match="positive finite"):
        bootstrap_app_score([boot], math.inf)
