"""Attack scenarios on the simulator: non-forwarders, Sybil squatters, honest delivery."""

from __future__ import annotations

import random

import pytest

from meshmerge.daemon.gossip.adversary import NonForwardingRouter, build_swarm, honest_ip
from meshmerge.daemon.gossip.params import (
    GossipSubParams,
    ParamsError,
    PeerScoreParams,
    derive_score_params,
)
from meshmerge.daemon.gossip.router import GossipSubRouter
from meshmerge.daemon.gossip.sim import Network, Simulator
from meshmerge.proto.gossipsub import RPC, ControlGraft, ControlMessage, ControlPrune, PeerInfo, SubOpts
from meshmerge.proto.gossipsub_sign import Ed25519Identity

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


def _attack_at_dawn(n_boot: int, seed: int) -> tuple[float, int, int]:
    """Attack at dawn, small: 60 honest nodes and 240 Sybils (each dials 10 honest nodes and
    every bootstrapper) run for 30 s; then 6 honest nodes join, each dialling 2 honest nodes,
    8 Sybils and the ``n_boot`` bootstrappers (no mesh, PX on, vouched for through P5 by
    every honest node). Returns the joiners' delivery ratio for messages published from the
    join to 10 s before the end, and (delivered, wanted) pairs."""
    rng = random.Random(seed + 1000)  # build_swarm draws its identities from Random(seed)
    boot_ids = [Ed25519Identity(rng.randbytes(32)) for _ in range(n_boot)]
    sp, th = derive_score_params({"t": 1.0}, bootstrappers=[b.peer_id for b in boot_ids])
    sim = Simulator(Network(latency=(0.01, 0.1)), seed=seed)
    swarm = build_swarm(60, 240, sim=sim, score_params=sp, thresholds=th, seed=seed)
    boots = []
    for i, ident in enumerate(boot_ids):
        r = GossipSubRouter(
            ident, params=GossipSubParams.bootstrapper(), score_params=sp, thresholds=th, rng=random.Random(i)
        )
        b = sim.add_node(r, ip=honest_ip(1000 + i))
        for n in swarm.honest + swarm.sybils:
            sim.connect(n, b)
        r.subscribe("t", sim.now)
        sim.flush_node(b)
        boots.append(b)
    publish_every(swarm, 1.0, 118, seed=seed)  # publishers: the 60 original honest nodes
    joiners = []

    def join() -> None:
        for i in range(6):
            r = GossipSubRouter(
                Ed25519Identity(rng.randbytes(32)),
                score_params=sp,
                thresholds=th,
                rng=random.Random(rng.random()),
                now=sim.now,
            )
            node = sim.add_node(r, ip=honest_ip(2000 + i))
            for m in rng.sample(swarm.honest, 2) + rng.sample(swarm.sybils, 8) + boots:
                sim.connect(node, m)
            r.subscribe("t", sim.now)
            sim.flush_node(node)
            joiners.append(node)

    sim.call_at(30.0, join)
    sim.run_until(120.0)
    mids = [m for m, (t, _) in sim.published.items() if 30.0 <= t <= 110.0]
    got = sum(1 for m in mids for n in joiners if n.index in sim.delivered[m])
    want = len(mids) * len(joiners)
    return got / want, got, want


@pytest.mark.parametrize("seed", [1, 2])
def test_attack_at_dawn_late_joiners_recover_through_bootstrapper_px(seed: int) -> None:
    """Joiners whose only honest links are 2 random nodes get >= 99 % of the messages once
    they know one bootstrapper: its PRUNE carries PX of peers that delivered to it, accepted
    because P5 puts the bootstrapper above the accept-PX threshold, and dialled."""
    ratio, got, want = _attack_at_dawn(1, seed)
    assert ratio >= 0.99, (got, want)


def test_attack_at_dawn_bites_without_a_bootstrapper() -> None:
    """The same scenario without the bootstrapper: the joiners' single honest mesh peer
    prunes them (P3: they deliver nothing back to it) and they fall back on gossip, so the
    scenario above measures the defence, not a harmless setup (84-92 % over seeds 1-5)."""
    ratio, got, want = _attack_at_dawn(0, 1)
    assert ratio < 0.95, (got, want)


def test_bootstrapper_answers_every_graft_with_prune_and_ranked_px() -> None:
    """A bootstrapper keeps no mesh (even for outbound peers) and offers its best-scoring
    peers (those that delivered messages to it) before peers that never delivered."""
    sp, th = derive_score_params({"t": 1.0})
    sim = Simulator(seed=4)
    boot = GossipSubRouter(
        Ed25519Identity(bytes(32)),
        params=GossipSubParams.bootstrapper(prune_peers=3),
        score_params=sp,
        thresholds=th,
        rng=random.Random(1),
    )
    b = sim.add_node(boot, ip="100.64.9.1")
    swarm = build_swarm(6, 6, sim=sim, score_params=sp, thresholds=th, seed=4, honest_degree=3)
    for n in swarm.honest + swarm.sybils:
        sim.connect(b, n)  # the bootstrapper dialled them: outbound from its side
    boot.subscribe("t", sim.now)
    sim.flush_node(b)
    for k, n in enumerate(swarm.honest[:3]):
        sim.call_at(2.0 + k, lambda n=n: sim.publish(n, "t", b"proof of delivery"))
    sim.run_until(30.0)
    assert boot.mesh["t"] == set()
    proven = {n.peer_id for n in swarm.honest[:3]}
    assert all(boot.peer_score(p) > 0 for p in proven)
    raw = sim.add_node(None, peer_id=b"\x00joiner", ip="100.64.9.2")
    sim.connect(raw, b)
    sim.inject(raw, b, RPC(subscriptions=[SubOpts(True, "t")]))
    sim.inject(raw, b, RPC(control=ControlMessage(graft=[ControlGraft("t")])), at=sim.now + 0.5)
    sim.run_until(32.0)
    prunes = [p for _, _, rpc in raw.inbox if rpc.control for p in rpc.control.prune]
    assert len(prunes) == 1 and prunes[0].backoff == 60
    assert {pi.peer_id for pi in prunes[0].peers} == proven
    assert boot.mesh["t"] == set()


def test_simulator_dials_accepted_px_with_the_drivers_bounds() -> None:
    """PX from a P5-vouched peer is dialled after a handshake delay, at most
    ``max_concurrent_dials`` at once plus ``max_pending_dials`` waiting; PX from a peer
    below the accept-PX threshold is not dialled at all."""
    boot_id, stranger_id = b"\x01boot", b"\x02stranger"
    sp, th = derive_score_params({"t": 1.0}, bootstrappers=[boot_id])
    sim = Simulator(
        Network(latency=(0.05, 0.05)), seed=1, max_concurrent_dials=1, max_pending_dials=1, dial_rtts=2.0
    )
    a = sim.add_node(
        GossipSubRouter(Ed25519Identity(bytes(32)), score_params=sp, thresholds=th, rng=random.Random(1)),
        ip="100.64.0.1",
    )
    others = [
        sim.add_node(
            GossipSubRouter(Ed25519Identity(bytes([i]) * 32), rng=random.Random(i)), ip=f"100.64.1.{i}"
        )
        for i in range(1, 5)
    ]
    boot = sim.add_node(None, peer_id=boot_id, ip="100.64.2.1")
    stranger = sim.add_node(None, peer_id=stranger_id, ip="100.64.2.2")
    for raw in (boot, stranger):
        sim.connect(a, raw)
    assert a.router is not None
    a.router.subscribe("t", 0.0)
    px = [PeerInfo(peer_id=n.peer_id) for n in others]
    prune = RPC(control=ControlMessage(prune=[ControlPrune("t", px[:2], 60)]))
    sim.inject(stranger, a, prune)
    sim.run_until(5.0)
    assert not any(n.peer_id in a.links for n in others)
    sim.inject(boot, a, RPC(control=ControlMessage(prune=[ControlPrune("t", px, 60)])))
    sim.run_until(5.0 + 0.05 + 2 * 0.05 * 2.0 - 0.01)  # link latency, then one dial of 2 RTTs
    assert not any(n.peer_id in a.links for n in others)
    sim.run_until(10.0)
    dialled = [n for n in others if n.peer_id in a.links]
    assert len(dialled) == 2 and a.px_dials == 2  # one running + one waiting; two dropped
    assert sim.px_dials_dropped == 2
    for n in dialled:
        assert n.router is not None and a.peer_id in n.router.peers  # inbound on their side
