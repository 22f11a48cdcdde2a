"""Misbehaving routers and swarm builders for the simulator (tests and benchmarks).

Adversaries are real routers with one behaviour switched off, so everything
else they do (subscriptions, GRAFTs, heartbeats, wire format) is what a real
attacker running modified software would send.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshmerge.daemon.gossip.params import GossipSubParams, PeerScoreParams, PeerScoreThresholds
from meshmerge.daemon.gossip.router import GossipSubRouter
from meshmerge.daemon.gossip.sim import SimNode, Simulator
from meshmerge.proto.gossipsub import RPC, ControlIHave, ControlIWant, Message
from meshmerge.proto.gossipsub_sign import Ed25519Identity

__all__ = ["CovertFlashRouter", "NonForwardingRouter", "Swarm", "build_swarm", "honest_ip", "sybil_ip"]


class NonForwardingRouter(GossipSubRouter):
    """Joins meshes and accepts GRAFTs like an honest peer but never relays anything:
    no forwarding, no IWANT answers, no IHAVE gossip (the attacker of the formal analysis)."""

    def _forward(self, msg: Message, mid: bytes, topic: str, source: bytes, now: float) -> None:
        if source == self.peer_id:
            super()._forward(msg, mid, topic, source, now)

    def _handle_iwant(self, peer: bytes, iwants: list[ControlIWant], now: float) -> None:
        return

    def _emit_gossip(
        self, topic: str, exclude: set[bytes], mids: list[bytes], score: Callable[[bytes], float]
    ) -> None:
        return

    def _handle_ihave(self, peer: bytes, st: object, ihaves: list[ControlIHave], now: float) -> list[bytes]:
        return []


def honest_ip(i: int) -> str:
    """Distinct addresses for honest nodes (simulation only: 100.64.0.0/10 shared space)."""
    return f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def sybil_ip(i: int, hosts: int | None = None) -> str:
    """Sybil addresses; with ``hosts`` set, Sybils share that many IPs (P6 scenario)."""
    j = i if hosts is None else i % hosts
    return f"100.{96 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"


@dataclass
class Swarm:
    sim: Simulator
    honest: list[SimNode]
    sybils: list[SimNode]
    topic: str


def build_swarm(
    n_honest: int,
    n_sybil: int = 0,
    *,
    topic: str = "t",
    seed: int = 0,
    sim: Simulator | None = None,
    params: GossipSubParams | None = None,
    score_params: PeerScoreParams | None = None,
    thresholds: PeerScoreThresholds | None = None,
    honest_degree: int = 8,
    sybil_degree: int = 10,
    sybil_params: GossipSubParams | None = None,
    sybil_cls: type[GossipSubRouter] = NonForwardingRouter,
    sybil_ips: Callable[[int], str] = sybil_ip,
    subscribe_honest: bool = True,
    subscribe_sybils: bool = True,
    verify_signatures: bool = True,
    honest_targets_for_sybils: Sequence[int] | None = None,
) -> Swarm:
    """Honest nodes dial ``honest_degree`` random honest nodes; each Sybil dials
    ``sybil_degree`` random honest nodes (or the ``honest_targets_for_sybils``)."""
    sim = sim or Simulator(seed=seed)
    rng = random.Random(seed)
    honest: list[SimNode] = []
    for i in range(n_honest):
        r = GossipSubRouter(
            Ed25519Identity(rng.randbytes(32)),
            params=params,
            score_params=score_params,
            thresholds=thresholds,
            rng=random.Random(rng.random()),
            now=sim.now,
            verify_signatures=verify_signatures,
        )
        honest.append(sim.add_node(r, ip=honest_ip(i)))
    sybils: list[SimNode] = []
    for i in range(n_sybil):
        r = sybil_cls(
            Ed25519Identity(rng.randbytes(32)),
            params=sybil_params or params,
            rng=random.Random(rng.random()),
            now=sim.now,
            verify_signatures=False,
        )
        sybils.append(sim.add_node(r, ip=sybil_ips(i), honest=False))
    for n in honest:
        others = [m for m in honest if m is not n]
        for m in rng.sample(others, min(honest_degree, len(others))):
            sim.connect(n, m)
    for s in sybils:
        pool = [honest[i] for i in honest_targets_for_sybils] if honest_targets_for_sybils else honest
        for m in rng.sample(pool, min(sybil_degree, len(pool))):
            sim.connect(s, m)
    if subscribe_honest:
        for n in honest:
            assert n.router is not None
            n.router.subscribe(topic, sim.now)
            sim.flush_node(n)
    if subscribe_sybils:
        for s in sybils:
            assert s.router is not None
            s.router.subscribe(topic, sim.now)
            sim.flush_node(s)
    return Swarm(sim, honest, sybils, topic)


class CovertFlashRouter(GossipSubRouter):
    """Behaves honestly (and so builds score) until ``attack_at``, then relays nothing."""

    attack_at: float = 0.0
    _clock: float = 0.0

    def _attacking(self) -> bool:
        return self._clock >= self.attack_at

    def on_rpc(self, peer: bytes, rpc: RPC, now: float) -> None:
        self._clock = now
        super().on_rpc(peer, rpc, now)

    def on_heartbeat(self, now: float) -> None:
        self._clock = now
        super().on_heartbeat(now)

    def _forward(self, msg: Message, mid: bytes, topic: str, source: bytes, now: float) -> None:
        if source == self.peer_id or not self._attacking():
            super()._forward(msg, mid, topic, source, now)

    def _handle_iwant(self, peer: bytes, iwants: list[ControlIWant], now: float) -> None:
        if not self._attacking():
            super()._handle_iwant(peer, iwants, now)

    def _emit_gossip(
        self, topic: str, exclude: set[bytes], mids: list[bytes], score: Callable[[bytes], float]
    ) -> None:
        if not self._attacking():
            super()._emit_gossip(topic, exclude, mids, score)
