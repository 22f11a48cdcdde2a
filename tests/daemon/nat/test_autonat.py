"""AutoNAT v1 on loopback: dial-back must use a fresh connection.

The netns tests (test_nat_netns.py) classify peers behind real NAT; these
show the protocol core and the stock py-libp2p shortfall on loopback.
"""

from __future__ import annotations

import socket

import multiaddr
import pytest
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from meshmerge.daemon.nat.autonat import (
    PROTOCOL_ID,
    AutoNATClient,
    AutoNATConfig,
    AutoNATServer,
    Reachability,
    ReachabilityTracker,
)
from meshmerge.daemon.nat.hostfactory import running_host

LOOP = ["/ip4/127.0.0.1/tcp/0"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ids(n: int) -> list[ID]:
    from meshmerge.daemon.nat.hostfactory import key_pair

    return [ID.from_pubkey(key_pair(bytes([i]) * 32).public_key) for i in range(1, n + 1)]


def test_tracker_needs_threshold_distinct_servers_and_majority() -> None:
    a, b, c, d = _ids(4)
    t = ReachabilityTracker(threshold=3, result_ttl_s=100)
    assert t.record(a, False, 0) is None
    assert t.record(a, False, 1) is None  # same server twice is one vote
    assert t.record(b, False, 2) is None
    assert t.record(c, False, 3) is Reachability.PRIVATE
    assert t.record(d, True, 4) is None  # one dissenting server does not flip it
    assert t.status is Reachability.PRIVATE
    # votes expire
    assert t.evaluate(200) is None and t.votes() == {}


def test_tracker_flips_when_majority_changes() -> None:
    a, b = _ids(2)
    t = ReachabilityTracker(threshold=2, result_ttl_s=100)
    t.record(a, True, 0)
    assert t.record(b, True, 0) is Reachability.PUBLIC
    t.record(a, False, 1)
    assert t.status is Reachability.PUBLIC  # 1 vs 1: hold
    t.record(b, False, 2)
    assert t.status is Reachability.PRIVATE


def test_config_validate_names_field() -> None:
    with pytest.raises(ValueError, match="threshold"):
        AutoNATConfig(threshold=0).validate()
    with pytest.raises(ValueError, match="max_msg_bytes"):
        AutoNATConfig(max_msg_bytes=10**6).validate()


async def _body_stock_autonat_reports_closed_port_as_public() -> None:
    """Stock 0.8.1 dials back with host.connect, which reuses the existing connection."""
    async with running_host(LOOP) as server, running_host([]) as client:
        AutoNATService(server)  # registers the stock handler
        await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
        # the client listens nowhere; it asks to be dialed on a port that is closed
        closed = _closed_port()
        ours = AutoNATClient(client, AutoNATConfig(threshold=1))
        addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{closed}")
        assert await ours.probe(server.get_id(), [addr]) is True  # stock server says OK: wrong
        # our server, same request: the fresh dial-back fails
    cfg = AutoNATConfig(threshold=1, peer_min_interval_s=0)
    async with running_host(LOOP) as server, AutoNATServer(server, cfg).running(), running_host([]) as client:
        await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
        assert await AutoNATClient(client, cfg).probe(server.get_id(), [addr]) is False


async def _body_our_server_dials_back_on_a_fresh_connection() -> None:
    cfg = AutoNATConfig(threshold=1, peer_min_interval_s=0)
    async with running_host(LOOP) as server, AutoNATServer(server, cfg).running():
        async with running_host([]) as closed:
            await closed.connect(info_from_p2p_addr(server.get_addrs()[0]))
            assert await AutoNATClient(closed, cfg).probe(server.get_id()) is False
        async with running_host(LOOP) as open_:
            await open_.connect(info_from_p2p_addr(server.get_addrs()[0]))
            client = AutoNATClient(open_, cfg)
            seen: list[Reachability] = []
            client.add_listener(seen.append)
            assert await client.check([server.get_id()]) is Reachability.PUBLIC
            assert seen == [Reachability.PUBLIC]
            # the dial-back came from another identity and was closed again
            peers = set(open_.get_connected_peers())
            assert peers == {server.get_id()}


async def _body_server_rejects_garbage_and_rate_limits() -> None:
    cfg = AutoNATConfig(threshold=1, peer_min_interval_s=60)
    async with running_host(LOOP) as server, AutoNATServer(server, cfg).running(), running_host(LOOP) as c:
        await c.connect(info_from_p2p_addr(server.get_addrs()[0]))
        s = await c.new_stream(server.get_id(), [PROTOCOL_ID])
        await s.write(b"\x05hello")
        with trio.fail_after(5):
            data = await s.read(1024)
        assert b"\x08\xc8\x01" in data or data  # E_BAD_REQUEST (200) answer
        await s.close()
        client = AutoNATClient(c, cfg)
        assert await client.probe(server.get_id()) is True
        from meshmerge.daemon.nat.autonat import AutoNATError

        with pytest.raises(AutoNATError, match="E_DIAL_REFUSED"):
            await client.probe(server.get_id())


def test_stock_autonat_reports_closed_port_as_public() -> None:
    trio.run(_body_stock_autonat_reports_closed_port_as_public)


def test_our_server_dials_back_on_a_fresh_connection() -> None:
    trio.run(_body_our_server_dials_back_on_a_fresh_connection)


def test_server_rejects_garbage_and_rate_limits() -> None:
    trio.run(_body_server_rejects_garbage_and_rate_limits)


async def _body_client_run_loop_reports_public_after_threshold() -> None:
    cfg = AutoNATConfig(threshold=2, peer_min_interval_s=0, unknown_probe_interval_s=0.5)
    async with (
        running_host(LOOP) as s1,
        running_host(LOOP) as s2,
        AutoNATServer(s1, cfg).running(),
        AutoNATServer(s2, cfg).running(),
        running_host(LOOP) as me,
    ):
        for s in (s1, s2):
            await me.connect(info_from_p2p_addr(s.get_addrs()[0]))
        client = AutoNATClient(me, cfg)
        seen: list[Reachability] = []
        client.add_listener(seen.append)
        modes: list[str] = []

        async def set_mode(status: Reachability) -> None:  # what the DHT hook looks like
            await trio.sleep(0)
            modes.append("server" if status is Reachability.PUBLIC else "client")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            nursery.start_soon(client.watch, set_mode)
            with trio.fail_after(15):
                while not modes:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        assert seen == [Reachability.PUBLIC]
        assert modes == ["server"]
        assert set(client.tracker.votes()) == {s1.get_id(), s2.get_id()}


def test_client_run_loop_reports_public_after_threshold() -> None:
    trio.run(_body_client_run_loop_reports_public_after_threshold)
