"""Our Noise + yamux over real sockets: bulk data, flow control, bad peers, stock py-libp2p peers."""

from __future__ import annotations

import os
from typing import Any

import multiaddr
import pytest
import trio
import trio.testing
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.exceptions import MuxedConnUnavailable, MuxedStreamReset

from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.transport import NoiseTransport, YamuxConn
from meshmerge.daemon.transport.noise import NoiseProtocolError
from meshmerge.daemon.transport.yamux_state import INITIAL_WINDOW, TYPE_DATA, YamuxParams, header

from ..swarmkit import run

ECHO = TProtocol("/meshmerge-test/echo/1.0.0")
SINK = TProtocol("/meshmerge-test/sink/1.0.0")


def info_of(host: Any) -> PeerInfo:
    return PeerInfo(host.get_id(), list(host.get_transport_addrs()))


async def echo(stream: Any) -> None:
    try:
        while True:
            data = await stream.read(65536)
            await stream.write(data)
    except (StreamEOF, Exception):
        pass
    finally:
        await stream.close()


async def read_exactly(stream: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += await stream.read(n - len(out))
    return bytes(out)


def test_bulk_transfer_is_intact_in_both_directions() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # many windows, many 64 KiB Noise frames

    async def body() -> None:
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            b.set_stream_handler(ECHO, echo)
            await a.connect(info_of(b))
            stream = await a.new_stream(b.get_id(), [ECHO])
            got = bytearray()

            async def reader() -> None:
                got.extend(await read_exactly(stream, len(payload)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(0, len(payload), 100_000):
                    await stream.write(payload[i : i + 100_000])
            assert bytes(got) == payload
            await stream.close()

    run(body, 120)


def test_a_slow_reader_stalls_only_its_own_stream() -> None:
    """Stream A's receiver never reads: A's writer stops at the window; stream B is unaffected."""

    async def body() -> None:
        cfg = HostConfig()
        hold = trio.Event()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:

            async def sink(stream: Any) -> None:
                await hold.wait()  # never reads until the end of the test
                await stream.reset()

            b.set_stream_handler(SINK, sink)
            b.set_stream_handler(ECHO, echo)
            await a.connect(info_of(b))
            slow = await a.new_stream(b.get_id(), [SINK])
            written = 0
            with trio.move_on_after(2.0) as stalled:
                while True:
                    await slow.write(b"s" * 16384)
                    written += 16384
            assert stalled.cancelled_caught  # blocked on the window, not buffered without limit
            assert INITIAL_WINDOW - 16384 <= written <= INITIAL_WINDOW + 16384
            fast = await a.new_stream(b.get_id(), [ECHO])
            for i in range(20):
                with trio.fail_after(5):
                    await fast.write(b"ping %d" % i)
                    assert await read_exactly(fast, len(b"ping %d" % i)) == b"ping %d" % i
            await fast.close()
            hold.set()

    run(body, 60)


def test_stock_py_libp2p_peers_interoperate_both_ways() -> None:
    """py-libp2p's own Noise and Yamux are an independent implementation of both specs."""

    async def body() -> None:
        stock = new_host(key_pair=create_new_key_pair())
        stock.set_stream_handler(ECHO, echo)
        async with stock.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), running_host(HostConfig(), Identity.generate()) as ours:
            ours.set_stream_handler(ECHO, echo)
            await ours.connect(info_of(stock))  # we dial: our initiator, their responder
            s = await ours.new_stream(stock.get_id(), [ECHO])
            await s.write(b"x" * 300_000)
            assert await read_exactly(s, 300_000) == b"x" * 300_000
            await s.close()
            rtts = await PingService(ours).ping(stock.get_id(), 2)
            assert len(rtts) == 2
            await ours.disconnect(stock.get_id())
            with trio.fail_after(10):  # both sides must have dropped the old connection
                while ours.get_network().connections.get(stock.get_id()) or stock.get_network().connections.get(
                    ours.get_id()
                ):
                    await trio.sleep(0.02)
            await stock.connect(info_of(ours))  # they dial
            s2 = await stock.new_stream(ours.get_id(), [ECHO])
            await s2.write(b"hello from stock")
            assert await read_exactly(s2, 16) == b"hello from stock"
            await s2.close()

    run(body, 60)


class _Raw:
    """A raw connection over an in-memory trio stream (the Noise fallback path)."""

    def __init__(self, stream: trio.abc.Stream, initiator: bool) -> None:
        self._s = stream
        self.is_initiator = initiator

    async def read(self, n: int | None = None) -> bytes:
        return await self._s.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._s.send_all(data)

    async def close(self) -> None:
        await self._s.aclose()

    def get_remote_address(self) -> None:
        return None

    def get_transport_addresses(self) -> list[Any]:
        return []

    def get_connection_type(self) -> Any:
        return None


async def _secure_pair() -> tuple[Any, Any, Any, Any]:
    left, right = trio.testing.memory_stream_pair()
    ka, kb = create_new_key_pair(), create_new_key_pair()
    ta, tb = NoiseTransport(ka), NoiseTransport(kb)
    out: dict[str, Any] = {}

    async def dial() -> None:
        out["a"] = await ta.secure_outbound(_Raw(left, True), ID.from_pubkey(kb.public_key))

    async def accept() -> None:
        out["b"] = await tb.secure_inbound(_Raw(right, False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial)
        nursery.start_soon(accept)
    return out["a"], out["b"], ka, kb


def test_noise_over_any_stream_and_wrong_peer_id_is_refused() -> None:
    async def body() -> None:
        a, b, ka, kb = await _secure_pair()
        assert a.get_remote_peer() == ID.from_pubkey(kb.public_key)
        assert b.get_remote_peer() == ID.from_pubkey(ka.public_key)
        await a.write(b"z" * 200_000)
        assert await read_exactly(b, 200_000) == b"z" * 200_000

        left, right = trio.testing.memory_stream_pair()
        intruder = NoiseTransport(create_new_key_pair())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(intruder.secure_inbound, _Raw(right, False))
            with pytest.raises(NoiseProtocolError, match="peer id mismatch"):
                await NoiseTransport(ka).secure_outbound(_Raw(left, True), ID.from_pubkey(kb.public_key))
            nursery.cancel_scope.cancel()

    run(body, 30)


def test_garbage_handshake_is_a_clear_error() -> None:
    async def body() -> None:
        left, right = trio.testing.memory_stream_pair()
        await left.send_all(b"\x00\x05hello")  # too short for an ephemeral key
        with pytest.raises(NoiseProtocolError, match="message 1 is shorter"):
            await NoiseTransport(create_new_key_pair()).secure_inbound(_Raw(right, False))

    run(body, 30)


def test_yamux_protocol_violation_closes_the_session_cleanly() -> None:
    """A peer that sends more than the window gets GO_AWAY; our streams see a reset, nothing hangs."""

    async def body() -> None:
        a, b, _, kb = await _secure_pair()
        conn = YamuxConn(a, ID.from_pubkey(kb.public_key))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.start)
            await conn.event_started.wait()
            mine = await conn.open_stream()
            await mine.write(b"hi")
            # b speaks raw yamux: accept nothing, then flood stream 1 past its window
            await b.write(header(TYPE_DATA, 0, 1, INITIAL_WINDOW) + b"q" * INITIAL_WINDOW)
            await b.write(header(TYPE_DATA, 0, 1, 10) + b"q" * 10)
            with trio.fail_after(5):
                await conn.event_closed.wait()
            assert len(await mine.read()) == INITIAL_WINDOW  # what was within the window is readable
            with pytest.raises(MuxedStreamReset):
                await mine.read()
            with pytest.raises(MuxedConnUnavailable):
                await conn.accept_stream()

    run(body, 30)


def test_host_sockets_have_tcp_nodelay() -> None:
    """Small frames (DHT requests, gossip) must not wait for Nagle's algorithm."""
    import socket

    async def body() -> None:
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            await a.connect(info_of(b))
            with trio.fail_after(5):
                while not b.get_network().connections.get(a.get_id()):
                    await trio.sleep(0.01)
            for host, peer in ((a, b), (b, a)):
                session = host.get_network().connections[peer.get_id()][0].muxed_conn.secured_conn
                sock = session._wire.sock
                assert sock is not None  # the direct socket path, not the generic fallback
                assert sock.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    run(body, 30)


def test_keepalive_keeps_a_live_idle_session_and_ends_a_silent_one() -> None:
    params = YamuxParams(keepalive_interval=1, keepalive_timeout=1)

    async def body() -> None:
        a, b, ka, kb = await _secure_pair()
        left = YamuxConn(a, ID.from_pubkey(kb.public_key), params=params)
        right = YamuxConn(b, ID.from_pubkey(ka.public_key), params=params)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(left.start)
            nursery.start_soon(right.start)
            await trio.sleep(3.5)  # idle: both sides ping, both answer
            assert not left.is_closed and not right.is_closed
            assert left.state.ping_id >= 1
            nursery.cancel_scope.cancel()

        a, b, _, kb = await _secure_pair()
        lonely = YamuxConn(a, ID.from_pubkey(kb.public_key), params=params)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lonely.start)  # b never reads: its peer is gone silent
            with trio.fail_after(6):
                await lonely.event_closed.wait()
            assert lonely.state.ping_id >= 1
            nursery.cancel_scope.cancel()

    run(body, 30)


def test_write_nowait_takes_all_or_nothing_and_keeps_order() -> None:
    """`write_nowait` queues whole writes while the window lasts, then refuses without side effects;
    the bytes arrive in order with those of the waiting `write` that follows."""
    chunk = 10_000

    async def body() -> None:
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            got = bytearray()
            done = trio.Event()
            total = trio.Event()

            async def sink(stream: Any) -> None:
                await total.wait()  # do not read until the writer has run out of window
                try:
                    while True:
                        got.extend(await stream.read(65536))
                except Exception:
                    pass
                done.set()

            b.set_stream_handler(SINK, sink)
            await a.connect(info_of(b))
            stream = await a.new_stream(b.get_id(), [SINK])
            muxed = stream.muxed_stream
            sent = bytearray()
            i = 0
            while True:
                data = bytes([i % 251]) * chunk
                if not muxed.can_write_nowait(len(data)):
                    assert not muxed.write_nowait(data)
                    break
                assert muxed.write_nowait(data)
                sent += data
                i += 1
            # the initial window is all the sender may queue before the reader credits it
            assert INITIAL_WINDOW - chunk < len(sent) <= INITIAL_WINDOW
            assert not muxed.write_nowait(b"x" * chunk)  # still refused: nothing was queued
            total.set()
            tail = os.urandom(3 * INITIAL_WINDOW)
            await muxed.write(tail)  # waits for window updates
            sent += tail
            await stream.close()
            with trio.fail_after(30):
                await done.wait()
            assert bytes(got) == bytes(sent)
            await muxed.reset()
            assert not muxed.can_write_nowait(1) and not muxed.write_nowait(b"y")

    run(body, 60)


def test_set_receiver_pushes_data_buffers_while_detached_and_reports_the_end() -> None:
    async def body() -> None:
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            arrived: list[Any] = []
            handed = trio.Event()

            async def keep(stream: Any) -> None:
                arrived.append(stream)
                handed.set()
                await trio.sleep_forever()

            b.set_stream_handler(SINK, keep)
            await a.connect(info_of(b))
            stream = await a.new_stream(b.get_id(), [SINK])
            await stream.write(b"before")  # buffered: nobody reads or listens yet
            with trio.fail_after(10):
                await handed.wait()
                inbound = arrived[0].muxed_stream
                while not inbound._st.buf:
                    await trio.sleep(0.01)
            chunks: list[bytes] = []
            inbound.set_receiver(chunks.append)
            assert chunks == [b"before"]  # what was buffered is handed over at once
            await stream.write(b"one")
            with trio.fail_after(10):
                while chunks[-1] != b"one":
                    await trio.sleep(0.01)
            inbound.set_receiver(None)
            await stream.write(b"two")
            await trio.sleep(0.2)
            assert chunks == [b"before", b"one"]  # detached: stays in the stream's buffer
            inbound.set_receiver(chunks.append)
            assert chunks == [b"before", b"one", b"two"]
            await stream.close()
            with trio.fail_after(10):
                while chunks[-1] != b"":
                    await trio.sleep(0.01)
            assert chunks.count(b"") == 1  # the end is reported once

            def broken(data: bytes) -> None:
                raise RuntimeError("receiver bug")

            stream2 = await a.new_stream(b.get_id(), [SINK])
            await stream2.write(b"x")
            with trio.fail_after(10):
                while len(arrived) < 2 or not arrived[1].muxed_stream._st.buf:
                    await trio.sleep(0.01)
            arrived[1].muxed_stream.set_receiver(broken)  # raises inside: the stream is reset
            assert arrived[1].muxed_stream._st.reset
            with trio.fail_after(10), pytest.raises(Exception):  # noqa: B017 - any reset error
                while True:
                    await stream2.muxed_stream.read(10)

    run(body, 60)
