"""Helpers for tests that run real hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import trio
from libp2p.host.basic_host import BasicHost
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.dht import DHTConfig, KademliaDHT, running_dht
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity


@dataclass
class Node:
    identity: Identity
    host: BasicHost
    dht: KademliaDHT

    @property
    def info(self) -> PeerInfo:
        return PeerInfo(self.host.get_id(), list(self.host.get_transport_addrs()))


@asynccontextmanager
async def dht_swarm(
    n: int, dht_config: DHTConfig | None = None, host_config: HostConfig | None = None
) -> AsyncIterator[list[Node]]:
    """`n` hosts with DHTs; every node bootstraps from node 0."""
    async with AsyncExitStack() as stack:
        nodes = []
        for _ in range(n):
            ident = Identity.generate()
            host = await stack.enter_async_context(running_host(host_config or HostConfig(), ident))
            dht = await stack.enter_async_context(running_dht(host, dht_config or DHTConfig()))
            nodes.append(Node(ident, host, dht))
        for node in nodes[1:]:
            await node.dht.bootstrap([nodes[0].info])
        # a second round so early joiners learn about later ones
        for node in nodes:
            await node.dht.refresh()
        yield nodes


def run(fn: Callable[[], Awaitable[None]], timeout: float = 120.0) -> None:
    """Run an async test body under trio with a generous hang guard."""

    async def guarded() -> None:
        with trio.fail_after(timeout):
            await fn()

    trio.run(guarded)
