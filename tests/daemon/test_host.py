"""The host: Noise only, prompt dials, limits that bite with a clear log line.

Shortfall tests run stock py-libp2p 0.8.1 (`libp2p.new_host`) side by side with
ours to show the stock behaviour and the fix.
"""

from __future__ import annotations

import contextlib
import logging
import time

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from meshmerge.daemon.host import ConfigError, HostConfig, parse_listen_addr, peer_info, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.limits import ConnectionLimits

from .swarmkit import run

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def info_of(host) -> PeerInfo:  # type: ignore[no-untyped-def]
    return PeerInfo(host.get_id(), list(host.get_transport_addrs()))


def plaintext_dialer():  # type: ignore[no-untyped-def]
    kp = create_new_key_pair()
    return new_host(key_pair=kp, sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(kp)})


def test_stock_host_accepts_plaintext_ours_refuses_it() -> None:
    async def body() -> None:
        stock = new_host(key_pair=create_new_key_pair())
        dialer = plaintext_dialer()
        async with stock.run(LOOPBACK), dialer.run(LOOPBACK):
            await dialer.connect(info_of(stock))  # stock: an unencrypted session
            conn = dialer.get_network().connections[stock.get_id()][0]
            assert type(conn.muxed_conn.secured_conn).__name__ == "InsecureSession"

            async with running_host(HostConfig(), Identity.generate()) as ours:
                with pytest.raises(Exception, match="unable to connect"):
                    await dialer.connect(info_of(ours))
                assert dialer.get_network().connections.get(ours.get_id()) in (None, [])
                assert not ours.get_network().connections

    run(body, 60)


def test_our_host_speaks_noise_yamux_identify_ping() -> None:
    async def body() -> None:
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            await a.connect(info_of(b))
            conn = a.get_network().connections[b.get_id()][0]
            # our own Noise and yamux (meshmerge.daemon.transport), not py-libp2p's
            assert type(conn.muxed_conn.secured_conn).__name__ == "NoiseSession"
            assert type(conn.muxed_conn).__name__ == "YamuxConn"
            protos = set(b.get_mux().get_protocols())
            assert {"/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0"} <= protos
            rtts = await PingService(a).ping(b.get_id(), 3)
            assert len(rtts) == 3
            with trio.fail_after(10):
                while "/ipfs/ping/1.0.0" not in a.get_peerstore().get_protocols(b.get_id()):
                    await trio.sleep(0.02)  # identify filled the peerstore
            # identify carries a signed peer record (envelope) for b
            assert a.get_peerstore().get_peer_record(b.get_id()) is not None

    run(body, 60)


def test_stock_dial_waits_250ms_ours_returns_on_success() -> None:
    """Stock `Swarm.dial_peer` sits out its 250 ms happy-eyeballs delay even after success."""

    async def body() -> None:
        stock_a, stock_b = new_host(key_pair=create_new_key_pair()), new_host(key_pair=create_new_key_pair())
        async with stock_a.run(LOOPBACK), stock_b.run(LOOPBACK):
            t0 = time.perf_counter()
            await stock_a.connect(info_of(stock_b))
            stock_dial = time.perf_counter() - t0
        cfg = HostConfig()
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            t0 = time.perf_counter()
            await a.connect(info_of(b))
            ours = time.perf_counter() - t0
        assert stock_dial >= 0.24, stock_dial  # the fixed wait
        assert ours < 0.2, ours  # no fixed wait (benchmark: a few ms)

    run(body, 60)


def test_dial_falls_through_dead_address_quickly() -> None:
    async def body() -> None:
        cfg = HostConfig(dial_stagger=0.1)
        async with running_host(cfg, Identity.generate()) as a, running_host(cfg, Identity.generate()) as b:
            dead = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/1")
            await a.connect(PeerInfo(b.get_id(), [dead, *b.get_transport_addrs()]))
            assert a.get_network().connections[b.get_id()]
            with pytest.raises(Exception, match="failed on all"):
                await a.connect(PeerInfo(Identity.generate().peer_id, [dead]))

    run(body, 60)


def test_config_validation_names_field_and_rule() -> None:
    with pytest.raises(ConfigError, match=r"listen_addrs.*not a valid multiaddr"):
        HostConfig(listen_addrs=("/ip4/999.1.1.1/tcp/1",)).validate()
    with pytest.raises(ConfigError, match=r"listen_addrs.*wildcard"):
        HostConfig(listen_addrs=("/ip4/0.0.0.0/tcp/4001",)).validate()
    with pytest.raises(ConfigError, match=r"listen_addrs.*must be /ip4"):
        HostConfig(listen_addrs=("/ip4/127.0.0.1/udp/4001",)).validate()
    with pytest.raises(ConfigError, match="listen_addrs: at least one"):
        HostConfig(listen_addrs=()).validate()
    with pytest.raises(ConfigError, match="max_connections_per_ip_group"):
        HostConfig(limits=ConnectionLimits(max_connections_per_ip_group=0)).validate()
    with pytest.raises(ConfigError, match="dial_stagger"):
        HostConfig(dial_stagger=-1).validate()
    with pytest.raises(ConfigError, match="not a valid"):
        peer_info("/ip4/127.0.0.1/tcp/4001/p2p/not-a-peer-id")
    with pytest.raises(ConfigError, match="not a valid"):
        peer_info("garbage")
    assert str(parse_listen_addr("/ip6/::1/tcp/0")) == "/ip6/::1/tcp/0"
    assert HostConfig().listen_addrs == ("/ip4/127.0.0.1/tcp/0",)
    assert HostConfig().enable_mdns is False


def test_per_ip_group_and_per_peer_limits_bite_with_log_line(caplog: pytest.LogCaptureFixture) -> None:
    limits = ConnectionLimits(max_connections_per_ip_group=2, exempt_loopback=False)

    async def body() -> None:
        async with running_host(HostConfig(limits=limits), Identity.generate()) as server:
            dialers = []
            results = []
            async with (
                running_host(HostConfig(), Identity.generate()) as d1,
                running_host(HostConfig(), Identity.generate()) as d2,
                running_host(HostConfig(), Identity.generate()) as d3,
            ):
                dialers = [d1, d2, d3]
                for d in dialers:
                    try:
                        await d.connect(info_of(server))
                        results.append(True)
                    except Exception:
                        results.append(False)
                assert results == [True, True, False]
                assert server.get_network().refusals["max_connections_per_ip_group"] >= 1
                # after one leaves, a newcomer fits again: the node stays usable
                await d1.disconnect(server.get_id())
                with trio.fail_after(5):
                    while server.get_network().limiter.open_count > 1:
                        await trio.sleep(0.02)
                await d3.connect(info_of(server))
                assert len(await PingService(d3).ping(server.get_id(), 1)) == 1

    with caplog.at_level(logging.WARNING, logger="meshmerge.host"):
        run(body, 60)
    assert any(
        "limit max_connections_per_ip_group=2 reached for group 127.0.0.0/24" in r.getMessage()
        for r in caplog.records
    )


def test_inbound_rate_limit() -> None:
    limits = ConnectionLimits(inbound_connection_rate=0.5, inbound_connection_burst=2)

    async def body() -> None:
        async with running_host(HostConfig(limits=limits), Identity.generate()) as server:
            port = int(server.get_transport_addrs()[0].value_for_protocol("tcp"))
            closed_early = 0
            for _ in range(6):
                sock = await trio.open_tcp_stream("127.0.0.1", port)
                with trio.move_on_after(1):
                    data = await sock.receive_some(100)
                    if data == b"":
                        closed_early += 1
                await sock.aclose()
            assert closed_early >= 3
            assert server.get_network().refusals.get("inbound_connection_rate", 0) >= 3

    run(body, 60)


def test_stream_flood_is_reset_and_node_stays_up(caplog: pytest.LogCaptureFixture) -> None:
    limits = ConnectionLimits(max_streams_per_connection=8, max_inbound_streams=16)
    proto = TProtocol("/mm-test/hold/1")

    async def body() -> None:
        async with (
            running_host(HostConfig(limits=limits), Identity.generate()) as server,
            running_host(HostConfig(), Identity.generate()) as client,
        ):
            release = trio.Event()
            handled = 0

            async def hold(stream) -> None:  # type: ignore[no-untyped-def]
                nonlocal handled
                handled += 1
                await release.wait()
                await stream.close()

            server.set_stream_handler(proto, hold)
            await client.connect(info_of(server))
            streams = []
            for _ in range(40):
                try:
                    s = await client.new_stream(server.get_id(), [proto])
                    await s.write(b"x")
                    streams.append(s)
                except Exception:
                    pass
            with trio.fail_after(10):
                while server.get_network().refusals.get("max_streams_per_connection", 0) < 20:
                    await trio.sleep(0.05)
            assert handled <= 8
            release.set()
            for s in streams:
                with contextlib.suppress(Exception):
                    await s.reset()
            with trio.fail_after(10):
                while server.get_network()._inbound_streams:
                    await trio.sleep(0.05)
            # the connection and the node survive the flood
            assert len(await PingService(client).ping(server.get_id(), 1)) == 1

    with caplog.at_level(logging.WARNING, logger="meshmerge.host"):
        run(body, 60)
    assert any("max_streams_per_connection=8" in r.getMessage() for r in caplog.records)


def test_protocol_garbage_over_raw_tcp_keeps_node_up() -> None:
    async def body() -> None:
        async with (
            running_host(HostConfig(), Identity.generate()) as server,
            running_host(HostConfig(), Identity.generate()) as client,
        ):
            port = int(server.get_transport_addrs()[0].value_for_protocol("tcp"))
            payloads = [
                b"\x00" * 64,
                b"\x13/multistream/1.0.0\n" + b"\xff" * 200,
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"\x13/multistream/1.0.0\n\x0f/noise-garbage\n",
                b"\xff\xff\xff\xff\x0f" + b"A" * 1000,
            ]
            for data in payloads:
                sock = await trio.open_tcp_stream("127.0.0.1", port)
                try:
                    await sock.send_all(data)
                    with trio.move_on_after(3):
                        while await sock.receive_some(4096):
                            pass
                except trio.BrokenResourceError:
                    pass
                await sock.aclose()
            await client.connect(info_of(server))
            assert len(await PingService(client).ping(server.get_id(), 2)) == 2

    run(body, 90)


def test_stock_close_is_serial_100ms_per_connection_ours_is_concurrent() -> None:
    async def stock_close_time() -> float:
        center = new_host(key_pair=create_new_key_pair())
        peers = [new_host(key_pair=create_new_key_pair()) for _ in range(10)]
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(center.run(LOOPBACK))
            for p in peers:
                await stack.enter_async_context(p.run(LOOPBACK))
                await p.connect(info_of(center))
            t0 = time.perf_counter()
            await center.close()
            return time.perf_counter() - t0

    async def our_close_time() -> float:
        async with contextlib.AsyncExitStack() as stack:
            center = await stack.enter_async_context(running_host(HostConfig(), Identity.generate()))
            for _ in range(10):
                p = await stack.enter_async_context(running_host(HostConfig(), Identity.generate()))
                await p.connect(info_of(center))
            t0 = time.perf_counter()
            await center.close()
            return time.perf_counter() - t0

    times: dict[str, float] = {}

    async def body() -> None:
        times["stock"] = await stock_close_time()
        times["ours"] = await our_close_time()

    run(body, 90)
    assert times["stock"] >= 1.0, times  # 10 connections x 100 ms sleep, one after another
    assert times["ours"] < 0.8, times


def test_silent_inbound_connection_is_dropped_after_handshake_timeout() -> None:
    async def body() -> None:
        cfg = HostConfig(handshake_timeout=1.0)
        async with (
            running_host(cfg, Identity.generate()) as server,
            running_host(HostConfig(), Identity.generate()) as client,
        ):
            port = int(server.get_transport_addrs()[0].value_for_protocol("tcp"))
            socks = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
            with trio.fail_after(5):
                while server.get_network().limiter.pending_count < 5:
                    await trio.sleep(0.02)
            with trio.fail_after(8):
                for sock in socks:
                    while True:
                        try:
                            if await sock.receive_some(4096) == b"":
                                break
                        except trio.BrokenResourceError:
                            break
                while server.get_network().limiter.pending_count:
                    await trio.sleep(0.05)
            for sock in socks:
                await sock.aclose()
            await client.connect(info_of(server))

    run(body, 60)


def test_announced_addresses_reach_peers_by_identify() -> None:
    """`[network] announce`: an address the node cannot observe (a port forward) is advertised."""
    public = multiaddr.Multiaddr("/ip4/203.0.113.7/tcp/4001")

    async def body() -> None:
        announcing = HostConfig(announce_addrs=(str(public),))
        async with (
            running_host(announcing, Identity.generate()) as a,
            running_host(HostConfig(), Identity.generate()) as b,
        ):
            assert any(str(addr).startswith(str(public) + "/p2p/") for addr in a.get_addrs())
            await b.connect(info_of(a))
            with trio.fail_after(10):
                while not any(
                    str(x).startswith(f"{public}/p2p/") for x in b.get_peerstore().addrs(a.get_id())
                ):
                    await trio.sleep(0.02)  # identify delivered it

    run(body, 60)
    with pytest.raises(ConfigError, match="announce.*wildcard"):
        HostConfig(announce_addrs=("/ip4/0.0.0.0/tcp/4001",)).validate()
