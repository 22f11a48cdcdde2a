"""Peer exchange between our driver and go-libp2p-pubsub (p2pd) over loopback TCP.

p2pd cannot switch PX on (go's default is off, and its flags do not expose it),
so go never *sends* PX here; the direction we can test is the one that checks
our wire format: go consuming the signed peer record we hand it in a PRUNE,
verifying it, and dialling the peer it names.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.gossip.driver import GossipConfig, GossipService, Validation
from meshmerge.daemon.gossip.params import GossipSubParams, PeerScoreThresholds
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.testing.interop import run_trio, wait_until
from meshmerge.testing.interop.gopeer import start_go_peer
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop

TOPIC = "/meshmerge/1/set/px-interop"


async def _accept(author: bytes, data: bytes) -> Validation:
    return Validation.ACCEPT


async def _ignore(author: bytes, data: bytes) -> None:
    return None


def test_go_dials_the_peer_named_by_our_signed_px_record(interop_tools: InteropTools) -> None:
    """B (ours, PX on) prunes go G on leaving the topic, naming C (ours) with C's signed record."""
    # C never acts on PX itself (threshold out of reach without scoring), so a G-C link is go's doing
    c_config = GossipConfig(thresholds=PeerScoreThresholds(accept_px_threshold=1e9))
    b_config = GossipConfig(params=GossipSubParams(do_px=True))

    async def body() -> None:
        async with start_go_peer(interop_tools) as go, AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            ib, ic = Identity.generate(), Identity.generate()
            hb = await stack.enter_async_context(running_host(HostConfig(), ib))
            hc = await stack.enter_async_context(running_host(HostConfig(), ic))
            b, c = GossipService(hb, ib, b_config), GossipService(hc, ic, c_config)
            for svc in (b, c):
                await nursery.start(svc.run)
                svc.subscribe(TOPIC, _accept, _ignore)
            g = go.peer_id
            async with go.subscribe(TOPIC):
                await hb.connect(PeerInfo(g, go.addrs))
                await hc.connect(PeerInfo(hb.get_id(), list(hb.get_transport_addrs())))

                async def ready() -> bool:
                    return (
                        g.to_bytes() in b.router.mesh.get(TOPIC, ())
                        and ic.peer_id.to_bytes() in b.router.topics.get(TOPIC, ())
                        and hb.get_peerstore().get_peer_record(ic.peer_id) is not None
                    )

                await wait_until(
                    ready, timeout=20, what="G in B's mesh, C a topic peer of B, C's record at B"
                )
                assert ic.peer_id not in {p.peer_id for p in await go.list_peers()}

                b.unsubscribe(TOPIC)  # PRUNE to G with PX: C and its signed record

                async def go_dialled_c() -> bool:
                    return bool(hc.get_network().get_connections(g))

                await wait_until(go_dialled_c, timeout=30, what="go dialling C from our PX record")
                assert ic.peer_id in {p.peer_id for p in await go.list_peers()}
                assert (c.stats.px_records, c.stats.px_invalid, c.stats.dials) == (0, 0, 0)

    run_trio(body, timeout=120)
