"""Small swarms of one kind: started concurrently, connected in a ring, DHT and gossip work across hops."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from meshmerge.testing.interop import run_trio, wait_until
from meshmerge.testing.interop.anypeer import start_swarm, topology_edges
from meshmerge.testing.interop.common import raw_cid
from meshmerge.testing.interop.gopeer import GO_MESH_SETTLE, GoPeer, provide_when_routable
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop


def test_topology_edges() -> None:
    assert topology_edges(4, "ring") == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert topology_edges(3, "full") == [(0, 1), (0, 2), (1, 2)]
    assert topology_edges(3, "star") == [(1, 0), (2, 0)]
    assert topology_edges(2, "ring") == [(0, 1)]
    assert topology_edges(5, "none") == []
    with pytest.raises(ValueError, match="topology"):
        topology_edges(3, "tree")  # type: ignore[arg-type]


def test_go_ring_of_six_provider_and_gossip_across_hops(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with start_swarm("go", 6, interop_tools, topology="ring") as peers:
            gos = [p.impl for p in peers if isinstance(p.impl, GoPeer)]
            assert len(gos) == 6
            first, far = gos[0], gos[3]

            cid = raw_cid(b"ring provide")
            await provide_when_routable(first, cid)
            providers = await far.dht_find_providers(cid, count=1)
            assert [p.peer_id for p in providers] == [first.peer_id]

            # gossip crosses hops only through subscribed relays: everyone subscribes
            async with AsyncExitStack() as stack:
                subs = [await stack.enter_async_context(g.subscribe("ring")) for g in gos]

                async def all_know_neighbours() -> bool:
                    return all([len(await g.pubsub_list_peers("ring")) >= 2 for g in gos])

                await wait_until(all_know_neighbours, what="ring subscriptions exchanged")
                await trio.sleep(GO_MESH_SETTLE)
                await first.pubsub_publish("ring", b"across the ring")
                with trio.fail_after(10):
                    while (await subs[3].receive()).data != b"across the ring":
                        pass

    run_trio(body, timeout=90)
