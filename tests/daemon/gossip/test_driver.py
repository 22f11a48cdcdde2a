"""GossipService on real py-libp2p hosts over loopback TCP."""

from __future__ import annotations

import trio

from tests.daemon.gossip.netkit import gossip_nodes, mesh_ready, wait_for
from tests.daemon.swarmkit import run

TOPIC = "/meshmerge/1/set/test"


def test_two_nodes_deliver_100_each_way() -> None:
    async def body() -> None:
        async with gossip_nodes(2) as (a, b):
            a.join(TOPIC)
            b.join(TOPIC)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            for i in range(100):
                await a.service.publish(TOPIC, b"a%d" % i)
                await b.service.publish(TOPIC, b"b%d" % i)
            await wait_for(lambda: len(a.received[TOPIC]) == 100 and len(b.received[TOPIC]) == 100,
                           what="deliveries")
            assert {d for _, d in b.received[TOPIC]} == {b"a%d" % i for i in range(100)}
            assert {d for _, d in a.received[TOPIC]} == {b"b%d" % i for i in range(100)}
            assert all(author == a.pid for author, _ in b.received[TOPIC])
            await trio.sleep(0.5)
            assert len(a.received[TOPIC]) == 100  # no duplicates

    run(body, timeout=60)
