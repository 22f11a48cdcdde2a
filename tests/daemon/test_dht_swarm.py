"""The DHT on real hosts over loopback: a 20-node swarm, shortfalls of stock
py-libp2p 0.8.1's KadDHT next to ours, and hostile input."""

from __future__ import annotations

import contextlib
import hashlib
import logging

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode as StockMode
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message, Record
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service.context import background_trio_service

from meshmerge.daemon.dht import DHTConfig, DHTMode, RecordRejected, SignedRecord, meshmerge_key
from meshmerge.daemon.dht.wire import PROTOCOL_ID, FrameReader, encode_frame

from .swarmkit import dht_swarm, run

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def cid_of(data: bytes) -> bytes:
    return bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()


def test_twenty_node_swarm_put_get_provide_find(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with dht_swarm(20) as nodes:
            assert all(len(n.dht.routing) >= 10 for n in nodes)
            for i in range(5):
                writer, reader = nodes[i], nodes[19 - i]
                key = meshmerge_key(writer.identity.public_key, b"round/%d" % i)
                value = SignedRecord.create(key, 1, b"v%d" % i, writer.identity.sign)
                assert await writer.dht.put_value(key, value) >= 10
                assert reader.dht.values.get(key, trio.current_time()) in (None, value)
                assert await reader.dht.get_value(key) == value
                # a newer record wins everywhere, including where the old one is cached
                newer = SignedRecord.create(key, 2, b"w%d" % i, writer.identity.sign)
                await writer.dht.put_value(key, newer)
                assert await reader.dht.get_value(key) == newer

                cid = cid_of(b"blob %d" % i)
                assert await nodes[i + 5].dht.provide(cid) >= 10
                found = await nodes[14 - i].dht.find_providers(cid, count=1)
                assert [p.peer_id for p in found] == [nodes[i + 5].host.get_id()]
                assert found[0].addrs

            target = nodes[18]
            info = await nodes[1].dht.find_peer(target.host.get_id())
            assert info is not None and info.addrs
            missing = await nodes[1].dht.get_value(meshmerge_key(bytes(32), b"nobody/wrote/this"))
            assert missing is None

    with caplog.at_level(logging.WARNING):
        run(body, 180)
    # normal request/response traffic logs nothing at WARNING or above
    noisy = [r for r in caplog.records if r.name.startswith(("meshmerge.dht", "libp2p.kad_dht"))]
    assert noisy == []


async def _stock_pair():  # type: ignore[no-untyped-def]
    a, b = new_host(key_pair=create_new_key_pair()), new_host(key_pair=create_new_key_pair())
    return a, b


def test_stock_get_value_returns_local_copy_without_lookup_ours_asks_network() -> None:
    async def body() -> None:
        # --- stock: B has an old local copy; A holds a newer value; B never asks A
        a, b = await _stock_pair()
        async with a.run(LOOPBACK), b.run(LOOPBACK):
            da, db = KadDHT(a, StockMode.SERVER), KadDHT(b, StockMode.SERVER)
            async with background_trio_service(da), background_trio_service(db):
                asked = 0
                inner = da.handle_stream

                async def counting(stream):  # type: ignore[no-untyped-def]
                    nonlocal asked
                    asked += 1
                    await inner(stream)

                a.set_stream_handler(PROTOCOL_ID, counting)
                await b.connect(PeerInfo(a.get_id(), a.get_transport_addrs()))
                await db.add_peer(a.get_id())
                await da.add_peer(b.get_id())
                da.value_store.put(b"/v/k", b"new")
                db.value_store.put(b"/v/k", b"old")
                assert await db.get_value("/v/k") == b"old"
                assert asked == 0

        # --- ours: same situation, the newer record is found over the network
        async with dht_swarm(2) as (na, nb):
            key = meshmerge_key(na.identity.public_key, b"k")
            old = SignedRecord.create(key, 1, b"old", na.identity.sign)
            new = SignedRecord.create(key, 2, b"new", na.identity.sign)
            nb.dht.values.put(key, old, trio.current_time())
            na.dht.values.put(key, new, trio.current_time())
            before = na.dht.stats["inbound_requests"]
            assert await nb.dht.get_value(key) == new
            assert na.dht.stats["inbound_requests"] > before

    run(body, 90)


def test_stock_dht_logs_warnings_and_accepts_any_key_ours_does_not(caplog: pytest.LogCaptureFixture) -> None:
    async def stock() -> None:
        a, b = await _stock_pair()
        async with a.run(LOOPBACK), b.run(LOOPBACK):
            da, db = KadDHT(a, StockMode.SERVER), KadDHT(b, StockMode.SERVER)
            async with background_trio_service(da), background_trio_service(db):
                await b.connect(PeerInfo(a.get_id(), a.get_transport_addrs()))
                await db.add_peer(a.get_id())
                await da.add_peer(b.get_id())
                await db.put_value("anything-goes", b"unvalidated")
                await trio.sleep(0.3)
                assert da.value_store.get(b"anything-goes") is not None  # no validation by default

    with caplog.at_level(logging.WARNING):
        run(stock, 60)
    assert [r for r in caplog.records if r.name.startswith("libp2p.kad_dht") and r.levelno >= logging.WARNING]
    caplog.clear()

    async def ours() -> None:
        async with dht_swarm(3) as nodes:
            with pytest.raises(RecordRejected, match="no validator"):
                await nodes[1].dht.put_value(b"/anything/goes", b"unvalidated")
            with pytest.raises(RecordRejected, match="must start with"):
                await nodes[1].dht.get_value(b"anything-goes")
            with pytest.raises(TypeError):
                await nodes[1].dht.get_value("str-key")  # type: ignore[arg-type]
            key = meshmerge_key(nodes[1].identity.public_key, b"x")
            await nodes[1].dht.put_value(key, SignedRecord.create(key, 1, b"ok", nodes[1].identity.sign))
            assert await nodes[2].dht.get_value(key)

    with caplog.at_level(logging.WARNING):
        run(ours, 60)
    assert [r for r in caplog.records if r.name.startswith(("meshmerge.dht", "libp2p.kad_dht"))] == []


def test_oversized_and_invalid_records_are_rejected_clearly() -> None:
    async def body() -> None:
        async with dht_swarm(3, DHTConfig(max_value_bytes=1024)) as nodes:
            a, b = nodes[1], nodes[2]
            key = meshmerge_key(a.identity.public_key, b"big")
            big = SignedRecord.create(key, 1, b"x" * 5000, a.identity.sign)
            with pytest.raises(RecordRejected, match="max_value_bytes=1024"):
                await a.dht.put_value(key, big)
            # a raw PUT_VALUE of a forged record over the wire: stream reset, nothing stored
            forged = SignedRecord.create(key, 9, b"forged", b.identity.sign)
            for record_key, value in ((key, forged), (key, big), (b"/nope/x", b"v")):
                stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL_ID])
                msg = Message(
                    type=Message.PUT_VALUE, key=record_key, record=Record(key=record_key, value=value)
                )
                await stream.write(encode_frame(msg))
                with pytest.raises(Exception):  # noqa: B017 - reset surfaces as a stream error
                    await FrameReader(stream, 1 << 20).read()
            assert a.dht.values.get(key, trio.current_time()) is None
            assert a.dht.stats["inbound_bad"] >= 3

    run(body, 60)


def test_wire_garbage_and_stream_flood_bounded_node_stays_up() -> None:
    async def body() -> None:
        async with dht_swarm(3, DHTConfig(max_inbound_requests=4, inbound_idle_timeout=2)) as nodes:
            a, b = nodes[1], nodes[2]
            bad_frames = [
                b"\xff\xff\xff\xff\x7f",  # 34 GB length claim
                b"\x80\x80\x80\x80\x80\x80\x80\x01",  # overlong varint
                b"\x05\xff\xff\xff\xff\xff",  # undecodable protobuf
                encode_frame(Message(type=Message.GET_VALUE, key=b"")),
                encode_frame(Message(type=Message.FIND_NODE, key=b"k" * 5000)),
            ]
            for frame in bad_frames:
                stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL_ID])
                await stream.write(frame)
                with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017
                    await FrameReader(stream, 1 << 20).read()

            # flood: 30 concurrent idle streams; only 4 are served, the rest reset at once
            streams = []
            for _ in range(30):
                with contextlib.suppress(Exception):
                    streams.append(await b.host.new_stream(a.host.get_id(), [PROTOCOL_ID]))
            with trio.fail_after(10):
                while a.dht.stats["inbound_reset_busy"] < 20:
                    await trio.sleep(0.05)
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.reset()
            # the idle ones time out (inbound_idle_timeout) and the node answers again
            with trio.fail_after(15):
                while True:
                    try:
                        closest = await b.dht.find_closest_peers(b"anything")
                        if closest:
                            break
                    except Exception:
                        pass
                    await trio.sleep(0.2)

    run(body, 90)


def test_client_mode_does_not_serve_and_can_switch_back() -> None:
    async def body() -> None:
        async with dht_swarm(4) as nodes:
            c = nodes[3]
            await c.dht.set_mode(DHTMode.CLIENT)
            assert PROTOCOL_ID not in c.host.get_mux().get_protocols()
            with pytest.raises(Exception):  # noqa: B017
                await nodes[1].host.new_stream(c.host.get_id(), [PROTOCOL_ID])
            # a client still queries
            key = meshmerge_key(nodes[1].identity.public_key, b"c")
            await nodes[1].dht.put_value(key, SignedRecord.create(key, 1, b"x", nodes[1].identity.sign))
            assert await c.dht.get_value(key)
            await c.dht.set_mode("server")
            assert PROTOCOL_ID in c.host.get_mux().get_protocols()

    run(body, 60)


def test_reprovide_loop_reannounces() -> None:
    async def body() -> None:
        cfg = DHTConfig(reprovide_interval=0.5, provider_ttl=1.0)
        async with dht_swarm(4, cfg) as nodes:
            cid = cid_of(b"kept alive")
            await nodes[1].dht.provide(cid)
            await trio.sleep(2.5)  # the first announcement has expired by now
            found = await nodes[3].dht.find_providers(cid, count=1)
            assert [p.peer_id for p in found] == [nodes[1].host.get_id()]

    run(body, 60)


def test_periodic_refresh_finds_late_joiners_and_drops_dead_peers() -> None:
    async def body() -> None:
        cfg = DHTConfig(refresh_interval=0.3, request_timeout=1.0)
        async with dht_swarm(2, cfg) as (a, b):
            async with dht_swarm(1, cfg) as (late,):
                await late.dht.bootstrap([a.info])
                with trio.fail_after(10):
                    while late.dht.self_peer not in b.dht.routing:
                        await trio.sleep(0.1)  # via late's queries to b or b's own refresh
                assert b.dht.self_peer in late.dht.routing or a.dht.self_peer in late.dht.routing
            # `late` is gone: failed requests during refreshes evict it
            with trio.fail_after(15):
                while late.dht.self_peer in b.dht.routing:
                    await trio.sleep(0.1)

    run(body, 60)
