"""meshmerge's host and DHT against a js-libp2p 3.x peer over loopback TCP:
connect both ways, identify, ping, provide/find both ways, and put/get of our
signed /meshmerge/ records both ways (js runs a permissive /meshmerge/ validator;
ours verifies the signature of whatever js hands back)."""

from __future__ import annotations

import hashlib

import pytest
import trio
from libp2p.peer.peerinfo import PeerInfo

from meshmerge.daemon.dht import SignedRecord, meshmerge_key, running_dht
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.testing.interop import run_trio
from meshmerge.testing.interop.jspeer import JsPeer, start_js_peer
from meshmerge.testing.interop.tools import InteropTools

from .test_host_go import _identify_from

pytestmark = pytest.mark.interop


def raw_cid(data: bytes) -> bytes:
    return bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()


async def _js_knows(js: JsPeer) -> None:
    with trio.fail_after(15):
        while await js.dht_routing_table_size() == 0:
            await trio.sleep(0.1)


@pytest.mark.parametrize("direction", ["we_dial_js", "js_dials_us"])
def test_connect_identify_ping_both_ways(interop_tools: InteropTools, direction: str) -> None:
    async def body() -> None:
        async with (
            start_js_peer(interop_tools) as js,
            running_host(HostConfig(), Identity.generate()) as ours,
        ):
            if direction == "we_dial_js":
                await ours.connect(PeerInfo(js.peer_id, list(js.addrs)))
            else:
                await js.dial(f"{ours.get_transport_addrs()[0]}/p2p/{ours.get_id().to_base58()}")
            with trio.fail_after(10):
                while not ours.get_network().connections.get(js.peer_id):
                    await trio.sleep(0.05)
            conn = ours.get_network().connections[js.peer_id][0]
            # our own Noise and yamux (meshmerge.daemon.transport) against the independent peer
            assert type(conn.muxed_conn.secured_conn).__name__ == "NoiseSession"
            assert type(conn.muxed_conn).__name__ == "YamuxConn"

            js_ident = await _identify_from(ours, js.peer_id)
            assert {"/ipfs/kad/1.0.0", "/ipfs/ping/1.0.0"} <= set(js_ident.protocols)
            assert js_ident.signedPeerRecord
            seen = await js.identify_remote(ours.get_id())
            assert {"/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"} <= set(seen.protocols)

            assert len(await js.ping(ours.get_id(), count=3)) == 3
            stream = await ours.new_stream(js.peer_id, ["/ipfs/ping/1.0.0"])
            for _ in range(3):
                await stream.write(b"q" * 32)
                echo = b""
                while len(echo) < 32:
                    echo += await stream.read(32 - len(echo))
                assert echo == b"q" * 32
            await stream.close()

    run_trio(body, timeout=60)


def test_dht_provide_find_and_signed_put_get_both_ways(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with (
            start_js_peer(interop_tools) as js,
            running_host(HostConfig(), Identity.generate()) as host,
            running_dht(host) as dht,
        ):
            ident = Identity.generate()
            assert await dht.bootstrap([PeerInfo(js.peer_id, list(js.addrs))]) >= 1
            await _js_knows(js)

            # provider records, both ways
            cid_ours = raw_cid(b"meshmerge provides")
            assert await dht.provide(cid_ours) >= 1
            found = await js.dht_find_providers(cid_ours, count=1)
            assert [p.peer_id for p in found] == [host.get_id()]
            cid_js = raw_cid(b"js provides")
            await js.dht_provide(cid_js)
            dht.providers._items.clear()
            got = await dht.find_providers(cid_js, count=1)
            assert [p.peer_id for p in got] == [js.peer_id]

            # we put a signed record, js gets it
            key = meshmerge_key(ident.public_key, b"set/from-py")
            value = SignedRecord.create(key, 1, b"py payload", ident.sign)
            assert await dht.put_value(key, value) >= 1
            assert await js.dht_get(key, timeout=30) == value

            # js puts a signed record (made by us, carried by js), we get it over the network
            key2 = meshmerge_key(ident.public_key, b"set/from-js")
            value2 = SignedRecord.create(key2, 5, b"js payload", ident.sign)
            await js.dht_put(key2, value2)
            assert dht.values.get(key2, trio.current_time()) in (None, value2)
            dht.values._items.pop(key2, None)
            assert await dht.get_value(key2) == value2

            # a forged value that js accepts is refused by our validator
            key3 = meshmerge_key(ident.public_key, b"set/forged")
            forged = SignedRecord.create(key3, 1, b"evil", Identity.generate().sign)
            await js.dht_put(key3, forged)
            dht.values._items.pop(key3, None)
            assert await dht.get_value(key3) is None

            info = await js.dht_find_peer(host.get_id())
            assert info.peer_id == host.get_id()

    run_trio(body, timeout=120)
