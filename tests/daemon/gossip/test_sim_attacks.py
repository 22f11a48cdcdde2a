"""Attack scenarios on the simulator: non-forwarders, Sybil squatters, honest delivery."""

from __future__ import annotations

import random

import pytest

from meshmerge.daemon.gossip.adversary import NonForwardingRouter, build_swarm
from meshmerge.daemon.gossip.params import (
    GossipSubParams,
    ParamsError,
    PeerScoreParams,
    derive_score_params,
)
from meshmerge.daemon.gossip.sim import Network, Simulator

from .test_params import ETH_BEACON_BLOCK


def publish_every(
    swarm, start: float, count: int, interval: float = 1.0, size: int = 200, seed: int = 0
) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    sim = swarm.sim
    for k in range(count):
        node = rng.choice(swarm.honest)
        sim.call_at(
            start + k * interval,
            lambda node=node, k=k: sim.publish(node, swarm.topic, k.to_bytes(4, "big") * (size // 4)),
        )


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_honest_swarm_delivers_at_least_99_percent(loss: float) -> None:
    sp, th = derive_score_params({"t": 1.0})
    sim = Simulator(Network(latency=(0.01, 0.08), loss=loss), seed=3)
    swarm = build_swarm(40, sim=sim, score_params=sp, thresholds=th, seed=3)
    publish_every(swarm, 3.0, 60)
    sim.run_until(70.0)
    st = sim.delivery_stats()
    assert st["ratio"] >= 0.99, st
    for n in swarm.honest:
        assert n.router is not None
        assert 5 <= len(n.router.mesh["t"]) <= 12
        assert all(n.router.peer_score(p) >= 0 for p in n.router.mesh["t"])


def test_paper_parameters_are_refused() -> None:
    with pytest.raises(ParamsError, match="never forwards"):
        PeerScoreParams(topics={"t": ETH_BEACON_BLOCK}).validate()


def test_non_forwarder_goes_negative_and_is_pruned_within_bounded_heartbeats() -> None:
    sp, th = derive_score_params({"t": 2.0})
    activation = sp.topics["t"].mesh_message_deliveries_activation
    sim = Simulator(seed=5)
    swarm = build_swarm(12, 0, sim=sim, score_params=sp, thresholds=th, seed=5)
    # the attacker joins a minute in, after the honest meshes formed, and grafts everyone
    att_router = NonForwardingRouter(
        swarm.honest[0].router.identity.__class__(bytes(range(32))),  # type: ignore[union-attr]
        params=GossipSubParams(d=12, d_lo=12, d_hi=12, d_score=4, d_out=2),
        rng=random.Random(9),
    )
    publish_every(swarm, 2.0, 200, interval=0.5)
    sim.run_until(60.0)
    att = sim.add_node(att_router, ip="100.96.0.1", honest=False)
    for n in swarm.honest:
        sim.connect(att, n)
    att_router.subscribe("t", sim.now)
    sim.flush_node(att)
    sim.run_until(62.0)
    hosts = [n for n in swarm.honest if att.peer_id in n.router.mesh["t"]]  # type: ignore[union-attr]
    assert len(hosts) >= 6, "the attacker should get into meshes first"
    bound = activation + 5.0  # activation window, then a few heartbeats
    sim.run_until(62.0 + bound)
    for n in swarm.honest:
        r = n.router
        assert r is not None
        assert att.peer_id not in r.mesh["t"], f"still in a mesh after {bound:.0f} heartbeats"
    for n in hosts:
        assert n.router is not None
        assert n.router.peer_score(att.peer_id) < 0
    # and it stays out: its GRAFTs are refused while its score is negative
    sim.run_until(62.0 + bound + 120.0)
    assert all(att.peer_id not in n.router.mesh["t"] for n in swarm.honest)  # type: ignore[union-attr]
    assert sim.delivery_stats()["ratio"] >= 0.99


@pytest.mark.parametrize("seed", [11, 17])
def test_sybil_squatters_cannot_isolate_honest_nodes(seed: int) -> None:
    """10 honest + 40 never-forwarding Sybils that dial every honest node and GRAFT greedily.

    Fresh Sybils (score 0) refill honest meshes up to Dhi in waves (every time their
    backoff expires), which also bounces honest GRAFTs into backoff; each Sybil is burnt
    at a node once P3 activates there (negative, refused from then on), and opportunistic
    grafting (every 60 heartbeats) pulls high-scoring honest peers back in. Each honest
    node has at least 4 honest connections (it dials 4), so 3 honest mesh peers is a
    property of the router, not of the topology.
    """
    sp, th = derive_score_params({"t": 1.0})
    greedy = GossipSubParams(d=12, d_lo=12, d_hi=12, d_score=4, d_out=2)
    sim = Simulator(seed=seed)
    swarm = build_swarm(
        10,
        40,
        sim=sim,
        score_params=sp,
        thresholds=th,
        seed=seed,
        honest_degree=4,
        sybil_degree=10,
        sybil_params=greedy,
    )
    publish_every(swarm, 1.0, 840, interval=0.5)
    honest_ids = {n.peer_id for n in swarm.honest}
    sim.run_until(255.0)  # four opportunistic grafting rounds
    for t in range(260, 421, 20):
        sim.run_until(float(t))
        for n in swarm.honest:
            assert n.router is not None
            mesh = n.router.mesh["t"]
            assert len(mesh & honest_ids) >= 3, (t, n.index, len(mesh & honest_ids), len(mesh))
    late = [m for m, (t, _) in sim.published.items() if 120.0 < t < 410.0]
    assert sim.delivery_stats(mids=late)["ratio"] >= 0.99
