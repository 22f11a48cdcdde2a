"""GossipSub attack scenarios on the virtual-time simulator: honest delivery rate and latency.

Scenarios (named after the GossipSub v1.1 hardening evaluation; definitions are ours):
  baseline      honest nodes only
  eclipse       every Sybil dials one victim (and a few others); victim's delivery reported
  censorship    every Sybil dials the 10 publishers, which publish all messages
  degradation   Sybils spread over the network, each dialling random honest nodes; never forward
  cold_boot     like degradation, but honest nodes and Sybils boot together and the
                whole run, boot included, is measured
  covert_flash  Sybils forward honestly (building score) until mid-run, then all stop at once
  attack_dawn   a wave of new honest nodes joins mid-run mostly through Sybils (2 honest + 8 Sybil
                dials each) but, as any deployment configures, knows the network's bootstrap
                nodes (--bootstrappers, spec v1.1 operators' recommendation: no mesh, PX on, P5
                vouched by every honest node); every honest node and every Sybil is connected to
                them too; new nodes' delivery
  ip_colocation like degradation with all Sybils behind 10 IP addresses (P6)
  degradation_unscored  degradation with peer scoring disabled (what scoring buys)

Every honest router uses score parameters derived from the publish rate
(derive_score_params), go-libp2p-pubsub defaults otherwise. Sybils are real routers
with relaying switched off. Each message is published by a random honest node (or a
censorship target), 1 msg/s, 200 bytes; delivery counts (message, honest node) pairs
for messages published between the warm-up and 10 s before the end.

    .venv/bin/python scripts/bench/gossip_sim.py                      # 1000 honest, 4000 Sybils, 300 s
    .venv/bin/python scripts/bench/gossip_sim.py --honest 200 --sybils 800 --duration 120
    .venv/bin/python scripts/bench/gossip_sim.py --scenarios attack_dawn --census 10,60,110  # peer states
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _table import machine, table

from meshmerge.daemon.gossip.adversary import (
    CovertFlashRouter,
    NonForwardingRouter,
    honest_ip,
    sybil_ip,
)
from meshmerge.daemon.gossip.params import GossipSubParams, derive_score_params
from meshmerge.daemon.gossip.router import GossipSubRouter
from meshmerge.daemon.gossip.sim import Network, SimNode, Simulator
from meshmerge.proto.gossipsub_sign import Ed25519Identity

TOPIC = "/meshmerge/1/set/bench"
SCENARIOS = [
    "baseline",
    "eclipse",
    "censorship",
    "degradation",
    "cold_boot",
    "covert_flash",
    "attack_dawn",
    "ip_colocation",
    "degradation_unscored",
]


def mesh_census(sim: Simulator, nodes: list[SimNode], label: str) -> None:
    """Print, averaged over ``nodes``, how their honest and Sybil peers stand: in the mesh,
    negative score, in backoff, or free to graft; and the mesh size distribution."""
    honest_ids = {n.peer_id for n in sim.nodes if n.honest}
    counts: dict[str, int] = {}
    sizes: dict[int, int] = {}
    for n in nodes:
        r = n.router
        assert r is not None
        mesh = r.mesh.get(TOPIC, set())
        sizes[len(mesh)] = sizes.get(len(mesh), 0) + 1
        for p in r.peers:
            kind = "honest" if p in honest_ids else "sybil"
            if p in mesh:
                state = "mesh"
            elif r.peer_score(p) < 0:
                state = "negative"
            elif r._backoff_active(TOPIC, p, sim.now):
                state = "backoff"
            else:
                state = "free"
            counts[f"{kind} {state}"] = counts.get(f"{kind} {state}", 0) + 1
    avg = ", ".join(f"{k} {v / max(1, len(nodes)):.2f}" for k, v in sorted(counts.items()))
    print(
        f"[census t={sim.now:.0f} {label} n={len(nodes)}] peers per node: {avg}; "
        f"mesh sizes {dict(sorted(sizes.items()))}",
        file=sys.stderr,
        flush=True,
    )


def run(
    name: str,
    n_honest: int,
    n_sybil: int,
    duration: float,
    seed: int,
    census: tuple[float, ...] = (),
    n_boot: int = 2,
) -> dict[str, object]:
    rng = random.Random(seed)
    if name != "attack_dawn":
        n_boot = 0
    # bootstrap identities come first: every honest node's P5 vouches for them
    boot_ids = [Ed25519Identity(rng.randbytes(32)) for _ in range(n_boot)]
    sp, th = derive_score_params({TOPIC: 1.0}, bootstrappers=[b.peer_id for b in boot_ids])
    if name == "degradation_unscored":
        sp = th = None  # type: ignore[assignment]
    if name == "baseline":
        n_sybil = 0
    sim = Simulator(Network(latency=(0.01, 0.1)), seed=seed)
    t_wall = time.perf_counter()
    cpu0 = time.process_time()

    def honest_router() -> GossipSubRouter:
        return GossipSubRouter(
            Ed25519Identity(rng.randbytes(32)),
            score_params=sp,
            thresholds=th,
            rng=random.Random(rng.random()),
            now=sim.now,
        )

    late_joiners = n_honest // 10 if name == "attack_dawn" else 0
    honest = [sim.add_node(honest_router(), ip=honest_ip(i)) for i in range(n_honest - late_joiners)]
    sybil_cls: type[GossipSubRouter] = CovertFlashRouter if name == "covert_flash" else NonForwardingRouter
    ip_of = (lambda i: sybil_ip(i, hosts=10)) if name == "ip_colocation" else sybil_ip
    sybils: list[SimNode] = []
    for i in range(n_sybil):
        r = sybil_cls(
            Ed25519Identity(rng.randbytes(32)), rng=random.Random(rng.random()), verify_signatures=False
        )
        if isinstance(r, CovertFlashRouter):
            r.attack_at = duration / 2
        sybils.append(sim.add_node(r, ip=ip_of(i), honest=False))

    boots = [
        sim.add_node(
            GossipSubRouter(
                ident,
                params=GossipSubParams.bootstrapper(),
                score_params=sp,
                thresholds=th,
                rng=random.Random(rng.random()),
                now=sim.now,
            ),
            ip=honest_ip(n_honest + i),
        )
        for i, ident in enumerate(boot_ids)
    ]
    for n in honest:
        for m in rng.sample(honest, min(8, len(honest))):
            sim.connect(n, m)
        for b in boots:
            sim.connect(n, b)
    publishers = honest
    victim: SimNode | None = None
    if name == "eclipse":
        victim = honest[0]
        for s in sybils:
            sim.connect(s, victim)
            for m in rng.sample(honest, 2):
                sim.connect(s, m)
    elif name == "censorship":
        publishers = honest[:10]
        for s in sybils:
            for m in publishers:
                sim.connect(s, m)
    else:
        for s in sybils:
            for m in rng.sample(honest, min(10, len(honest))):
                sim.connect(s, m)
            for b in boots:  # Sybils flood the bootstrappers as well
                sim.connect(s, b)

    start_measure = 0.0 if name == "cold_boot" else 30.0
    for n in boots + honest + sybils:
        assert n.router is not None
        n.router.subscribe(TOPIC, sim.now)
        sim.flush_node(n)

    joiners: list[SimNode] = []
    if late_joiners:
        t_join = duration / 3
        start_measure = t_join

        def join() -> None:
            for i in range(late_joiners):
                node = sim.add_node(honest_router(), ip=honest_ip(n_honest - late_joiners + i))
                for m in rng.sample(honest, 2):
                    sim.connect(node, m)
                for s in rng.sample(sybils, min(8, len(sybils))):
                    sim.connect(node, s)
                for b in boots:
                    sim.connect(node, b)
                assert node.router is not None
                node.router.subscribe(TOPIC, sim.now)
                sim.flush_node(node)
                joiners.append(node)

        sim.call_at(t_join, join)

    for k in range(int(duration) - 1):
        sim.call_at(
            1.0 + k + rng.random() * 0.5,
            lambda: sim.publish(rng.choice(publishers), TOPIC, rng.randbytes(200)),
        )
    setup_s = time.perf_counter() - t_wall
    # the network built above lives for the whole run: keep the cyclic collector from
    # re-scanning it (cost only; nothing here relies on collection timing)
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    for t in sorted(census):
        sim.run_until(t)
        mesh_census(sim, honest, "honest")
        if joiners:
            mesh_census(sim, joiners, "late joiners")
    sim.run_until(duration)
    wall = time.perf_counter() - t_wall
    cpu = time.process_time() - cpu0
    gc.set_threshold(*thresholds)
    gc.unfreeze()

    mids = [m for m, (t, _) in sim.published.items() if start_measure <= t <= duration - 10.0]
    stats = sim.delivery_stats(mids=mids, exclude=frozenset(b.index for b in boots))
    focus = "all honest"
    if victim is not None or joiners:
        targets = {victim.index} if victim is not None else {n.index for n in joiners}
        got = sum(1 for m in mids for i in targets if i in sim.delivered[m])
        want = len(mids) * len(targets)
        focus = f"victim {got}/{want}" if victim is not None else f"late joiners {got}/{want}"
        stats["focus_ratio"] = got / want if want else 1.0
    return {
        "scenario": name,
        "honest": n_honest,
        "sybils": n_sybil,
        "boot": n_boot,
        "sim_s": duration,
        "messages": len(mids),
        "delivery_%": 100.0 * stats["ratio"],
        "focus": focus + (f" ({100.0 * stats['focus_ratio']:.2f}%)" if "focus_ratio" in stats else ""),
        "p50_ms": 1000.0 * stats["p50"],
        "p99_ms": 1000.0 * stats["p99"],
        "frames_M": sim.frames / 1e6,
        "decoded_M": sim.decodes / 1e6,
        "px_dials": sum(n.px_dials for n in sim.nodes),
        "setup_s": setup_s,
        "wall_s": wall,
        "cpu_s": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--honest", type=int, default=1000)
    ap.add_argument("--sybils", type=int, default=4000)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument(
        "--bootstrappers",
        type=int,
        default=2,
        help="bootstrap nodes (no mesh, PX on) in attack_dawn; 0 = none (the attack without the defence)",
    )
    ap.add_argument(
        "--census",
        default="",
        help="comma-separated simulated times at which to print the honest nodes' peer states to stderr",
    )
    args = ap.parse_args()
    rows = []
    for name in args.scenarios.split(","):
        census = tuple(float(t) for t in args.census.split(",") if t)
        res = run(name, args.honest, args.sybils, args.duration, args.seed, census, args.bootstrappers)
        print(f"[gossip_sim] {res}", file=sys.stderr, flush=True)
        rows.append(res)
    headers = list(rows[0].keys())
    print("## gossip\n")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"Machine: {machine()}; peak RSS {rss:.0f} MiB\n")
    print(table(headers, [[r[h] for h in headers] for r in rows]))


if __name__ == "__main__":
    main()
