"""One interface over go, js and stock py peers, and small swarms of them.

Benchmarks and tests that compare implementations run the same steps on each
kind; `AnyPeer` gives them the few operations they share (dial, ping,
publish/subscribe, who-is-subscribed). `start_swarm` runs n peers of one kind
concurrently and connects them in a given topology.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from meshmerge.testing.interop.common import PubsubMessage
from meshmerge.testing.interop.gopeer import GoPeer, start_go_peer
from meshmerge.testing.interop.jspeer import JsPeer, start_js_peer
from meshmerge.testing.interop.pyhost import StockPyHost, start_stock_py_host
from meshmerge.testing.interop.tools import InteropTools, locate_tools

Kind = Literal["go", "js", "py"]
Topology = Literal["ring", "full", "star", "none"]
Receive = Callable[[], Awaitable[PubsubMessage]]


@dataclass
class AnyPeer:
    """A go, js or stock-py peer behind the operations all three support."""

    kind: Kind
    impl: GoPeer | JsPeer | StockPyHost

    @property
    def peer_id(self) -> ID:
        return self.impl.peer_id

    @property
    def addrs(self) -> list[Multiaddr]:
        return list(self.impl.addrs)

    @property
    def p2p_addrs(self) -> list[str]:
        return list(self.impl.p2p_addrs)

    async def dial(self, other: AnyPeer) -> float:
        """Connect to `other`; seconds as measured by the implementation's driver."""
        if isinstance(self.impl, GoPeer):
            t0 = time.perf_counter()
            await self.impl.connect(other.peer_id, other.addrs)
            return time.perf_counter() - t0
        if isinstance(self.impl, JsPeer):
            return await self.impl.dial(other.p2p_addrs[0])
        return await self.impl.connect(other.peer_id, other.addrs)

    async def connected_to(self, other: AnyPeer) -> bool:
        if isinstance(self.impl, GoPeer):
            return other.peer_id in [p.peer_id for p in await self.impl.list_peers()]
        if isinstance(self.impl, JsPeer):
            return other.peer_id in await self.impl.connected_peers()
        return other.peer_id in self.impl.host.get_connected_peers()

    async def ping(self, other: AnyPeer, count: int = 1) -> list[float]:
        return list(await self.impl.ping(other.peer_id, count=count))

    async def sees_subscriber(self, other: AnyPeer, topic: str) -> bool:
        if isinstance(self.impl, GoPeer):
            return other.peer_id in await self.impl.pubsub_list_peers(topic)
        if isinstance(self.impl, JsPeer):
            return other.peer_id in await self.impl.topic_peers(topic)
        return other.peer_id in self.impl.topic_peers(topic)

    async def publish(self, topic: str, data: bytes) -> None:
        if isinstance(self.impl, GoPeer):
            await self.impl.pubsub_publish(topic, data)
        else:
            await self.impl.publish(topic, data)

    @asynccontextmanager
    async def subscription(self, topic: str) -> AsyncIterator[Receive]:
        """A receive function for `topic`, subscribed while the block runs.

        go and js leave the subscription when the block exits; stock py-libp2p
        stays subscribed (its unsubscribe is not needed by our uses).
        """
        if isinstance(self.impl, GoPeer):
            async with self.impl.subscribe(topic) as go_sub:
                yield go_sub.receive
        elif isinstance(self.impl, JsPeer):
            js_sub = await self.impl.subscribe(topic)
            try:
                yield js_sub.receive
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await self.impl.unsubscribe(topic)
        else:
            py_sub = await self.impl.subscribe(topic)
            yield py_sub.receive


@asynccontextmanager
async def start_peer(
    kind: Kind, tools: InteropTools | None = None, *, gossipsub: bool = True
) -> AsyncIterator[AnyPeer]:
    """One peer of `kind` on 127.0.0.1 (stock py gets its stock GossipSub when `gossipsub`)."""
    tools = tools or locate_tools()
    if kind == "go":
        async with start_go_peer(tools) as go:
            yield AnyPeer(kind, go)
    elif kind == "js":
        async with start_js_peer(tools) as js:
            yield AnyPeer(kind, js)
    elif kind == "py":
        async with start_stock_py_host(gossipsub=gossipsub) as py:
            yield AnyPeer(kind, py)
    else:
        raise ValueError(f"kind must be 'go', 'js' or 'py', got {kind!r}")


def topology_edges(n: int, topology: Topology, seed: int = 0) -> list[tuple[int, int]]:
    """Dial pairs (dialer, listener) for n peers: ring, full mesh, star around peer 0, or none."""
    if topology == "none" or n < 2:
        return []
    if topology == "ring":
        return [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]
    if topology == "full":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if topology == "star":
        return [(i, 0) for i in range(1, n)]
    raise ValueError(f"topology must be ring, full, star or none, got {topology!r}")


async def connect_topology(peers: Sequence[AnyPeer], topology: Topology, timeout: float = 30.0) -> None:
    """Dial the topology's edges (concurrently, bounded) and wait until every dial returned."""
    edges = topology_edges(len(peers), topology)
    limiter = trio.CapacityLimiter(8)

    async def dial(i: int, j: int) -> None:
        async with limiter:
            await peers[i].dial(peers[j])

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for i, j in random.Random(0).sample(edges, len(edges)):
                nursery.start_soon(dial, i, j)


@asynccontextmanager
async def start_swarm(
    kind: Kind,
    n: int,
    tools: InteropTools | None = None,
    *,
    topology: Topology = "ring",
    startup_timeout: float = 120.0,
) -> AsyncIterator[list[AnyPeer]]:
    """n peers of one kind, started concurrently, connected per `topology`, stopped on exit."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    tools = tools or locate_tools()
    peers: list[AnyPeer | None] = [None] * n
    stop = trio.Event()
    started = trio.Semaphore(0)

    async def run_one(index: int) -> None:
        async with start_peer(kind, tools) as peer:
            peers[index] = peer
            started.release()
            await stop.wait()

    async with trio.open_nursery() as nursery:
        try:
            for index in range(n):
                nursery.start_soon(run_one, index)
            with trio.fail_after(startup_timeout):
                for _ in range(n):
                    await started.acquire()
            ready = [p for p in peers if p is not None]
            await connect_topology(ready, topology)
            yield ready
        finally:
            stop.set()
