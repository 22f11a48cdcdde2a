"""Real py-libp2p hosts on loopback running GossipService, for the driver tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.host.basic_host import BasicHost
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.gossip.driver import GossipConfig, GossipService, Validation
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity


@dataclass
class GNode:
    identity: Identity
    host: BasicHost
    service: GossipService
    received: dict[str, list[tuple[bytes, bytes]]] = field(default_factory=dict)

    @property
    def info(self) -> PeerInfo:
        return PeerInfo(self.host.get_id(), list(self.host.get_transport_addrs()))

    @property
    def pid(self) -> bytes:
        return self.host.get_id().to_bytes()

    def join(self, topic: str, verdict: Validation = Validation.ACCEPT, *, inline: bool = False) -> None:
        """Subscribe with a validator returning ``verdict``: async (worker path) or plain (inline)."""
        box = self.received.setdefault(topic, [])

        async def validator(author: bytes, data: bytes) -> Validation:
            return verdict

        def plain_validator(author: bytes, data: bytes) -> Validation:
            return verdict

        async def handler(author: bytes, data: bytes) -> None:
            box.append((author, data))

        self.service.subscribe(topic, plain_validator if inline else validator, handler)


@asynccontextmanager
async def gossip_nodes(
    n: int, config: GossipConfig | None = None, configs: list[GossipConfig] | None = None
) -> AsyncIterator[list[GNode]]:
    """`n` hosts, each with a running GossipService (not yet connected)."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes: list[GNode] = []
        for i in range(n):
            ident = Identity.generate()
            host = await stack.enter_async_context(running_host(HostConfig(), ident))
            cfg = configs[i] if configs else (config or GossipConfig())
            svc = GossipService(host, ident, cfg)
            await nursery.start(svc.run)
            nodes.append(GNode(ident, host, svc))
        yield nodes


async def wait_for(pred, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mesh_ready(nodes: list[GNode], topic: str, degree: int) -> bool:
    return all(len(node.service.router.mesh.get(topic, ())) >= degree for node in nodes)
