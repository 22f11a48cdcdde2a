"""The router on real py-libp2p hosts over TCP on loopback (our own peers on both ends)."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.gossip.driver import GossipService
from meshmerge.daemon.gossip.params import derive_score_params
from meshmerge.daemon.gossip.router import GossipSubRouter
from meshmerge.proto.gossipsub_sign import Ed25519Identity

T = "/meshmerge/1/set/test"


def make_node(i: int) -> tuple[object, GossipService]:
    seed = bytes([i + 1]) * 32
    host = new_host(key_pair=create_new_key_pair(seed))
    sp, th = derive_score_params({T: 10.0})
    router = GossipSubRouter(Ed25519Identity(seed), score_params=sp, thresholds=th, rng=random.Random(i))
    assert router.peer_id == host.get_id().to_bytes()
    return host, GossipService(host, router)


@pytest.mark.timeout(120)
def test_five_hosts_deliver_100_messages_each_way() -> None:
    async def main() -> None:
        nodes = [make_node(i) for i in range(5)]
        async with AsyncExitStack() as stack:
            for host, _ in nodes:
                await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))  # type: ignore[attr-defined]
            services = [await stack.enter_async_context(svc.running()) for _, svc in nodes]
            for i, (host, _) in enumerate(nodes):  # a ring plus chords
                for j in (i + 1, i + 2):
                    other = nodes[j % 5][0]
                    await host.connect(PeerInfo(other.get_id(), other.get_addrs()))  # type: ignore[attr-defined]
            for svc in services:
                svc.subscribe(T)
            with trio.fail_after(20):
                while not all(len(s.router.mesh[T]) >= 2 for s in services):
                    await trio.sleep(0.1)
            sent: dict[bytes, int] = {}
            for k in range(100):
                src = k % 5
                sent[services[src].publish(T, b"msg-%d" % k)] = src
                await trio.sleep(0.005)
            got: list[set[bytes]] = [set() for _ in services]

            async def collect(i: int) -> None:
                async for d in services[i].deliveries:
                    got[i].add(d.mid)

            with trio.move_on_after(20):
                async with trio.open_nursery() as nursery:
                    for i in range(5):
                        nursery.start_soon(collect, i)
                    while not all(len(got[i]) >= 80 for i in range(5)):
                        await trio.sleep(0.1)
                    await trio.sleep(0.5)
                    nursery.cancel_scope.cancel()
            for i in range(5):
                expected = {m for m, src in sent.items() if src != i}
                assert got[i] == expected, (i, len(got[i]), len(expected))
                for peer in services[i].router.mesh[T]:
                    assert services[i].router.peer_score(peer) >= 0

    trio.run(main)
