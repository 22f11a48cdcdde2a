"""AutoNAT v2 on loopback between real hosts: per-address verdicts, dial data for another IP,
refusals, nonce checks, hostile input. (Classification through real NATs: test_nat_netns.py.)"""

from __future__ import annotations

import contextlib
import socket

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.utils.varint import encode_varint_prefixed

from meshmerge.daemon.host import HostConfig
from meshmerge.daemon.host import running_host as daemon_host
from meshmerge.daemon.identity import Identity
from meshmerge.daemon.nat import autonat2_wire as wire
from meshmerge.daemon.nat.autonat import Reachability
from meshmerge.daemon.nat.autonat2 import (
    DIAL_BACK,
    DIAL_REQUEST,
    AutoNATv2Client,
    AutoNATv2Config,
    AutoNATv2Error,
    AutoNATv2Server,
)
from meshmerge.daemon.nat.hostfactory import running_host

from .test_circuit_addrs import _until

LOOP = ["/ip4/127.0.0.1/tcp/0"]
LOCAL = AutoNATv2Config(allow_private=True, threshold=1, dial_timeout_s=3)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


def _listen(host, ip: str) -> multiaddr.Multiaddr:  # type: ignore[no-untyped-def]
    return next(a for a in host.get_transport_addrs() if f"/ip4/{ip}/" in str(a))


async def _body_verdicts() -> None:
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.2/tcp/0"))
    async with running_host(LOOP) as srv_host, daemon_host(cfg, Identity.generate()) as cli_host:
        server = AutoNATv2Server(srv_host, LOCAL)
        async with server.running():
            client = AutoNATv2Client(cli_host, LOCAL)
            await cli_host.connect(info_from_p2p_addr(srv_host.get_addrs()[0]))
            sid = srv_host.get_id()
            mine = _listen(cli_host, "127.0.0.1")
            closed = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{_closed_port()}")
            other_ip = _listen(cli_host, "127.0.0.2")

            ok = await client.check(sid, [mine])
            assert (ok.reachable, ok.data_bytes, ok.addr) == (True, 0, mine)
            bad = await client.check(sid, [closed])
            assert (bad.reachable, bad.data_bytes) == (False, 0)
            # the server dials exactly one address: the first it accepts
            first = await client.check(sid, [multiaddr.Multiaddr("/ip4/203.0.113.5/udp/1/quic-v1"), mine])
            assert first.addr == mine and first.reachable is True
            # another IP than the one the request came from: padding first, then the dial
            far = await client.check(sid, [other_ip])
            assert (far.reachable, far.data_bytes) == (True, LOCAL.dial_data_bytes)
            assert server.stats["data_requested"] == 1
            assert client.status() == {
                str(mine): Reachability.PUBLIC,
                str(closed): Reachability.PRIVATE,
                str(other_ip): Reachability.PUBLIC,
            }

            # a client that will not pay that much aborts; the server dials nothing
            stingy = AutoNATv2Client(cli_host, AutoNATv2Config(allow_private=True, max_dial_data_bytes=1000))
            served = server.stats["served"]
            with pytest.raises(AutoNATv2Error, match="max_dial_data_bytes=1000"):
                await stingy.check(sid, [other_ip])
            assert server.stats["served"] == served


def test_per_address_verdicts_and_dial_data_on_loopback() -> None:
    trio.run(_body_verdicts)


async def _body_tiny_chunks() -> None:
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.2/tcp/0"))
    async with running_host(LOOP) as srv_host, daemon_host(cfg, Identity.generate()) as cli_host:
        server = AutoNATv2Server(srv_host, AutoNATv2Config(allow_private=True, dial_data_bytes=4096))
        async with server.running():
            await cli_host.connect(info_from_p2p_addr(srv_host.get_addrs()[0]))
            s = await cli_host.new_stream(srv_host.get_id(), [DIAL_REQUEST])
            far = _listen(cli_host, "127.0.0.2").to_bytes()
            await s.write(encode_varint_prefixed(wire.encode(wire.DialRequest((far,), 99))))
            with trio.fail_after(10):
                ask = wire.decode(await _recv_one(s))
                assert ask == wire.DialDataRequest(0, 4096)
                tiny = encode_varint_prefixed(wire.encode(wire.DialDataResponse(b"x")))
                with contextlib.suppress(Exception):  # the server resets the stream part-way
                    for _ in range(100):
                        await s.write(tiny)
                await _until(lambda: server.stats["bad"] == 1)
            assert server.stats["served"] == 0  # nothing was dialed for crumbs


async def _recv_one(stream) -> bytes:  # type: ignore[no-untyped-def]
    from libp2p.utils.varint import read_varint_prefixed_bytes_limited

    return bytes(await read_varint_prefixed_bytes_limited(stream, 8192))


def test_dial_data_in_crumbs_is_refused() -> None:
    trio.run(_body_tiny_chunks)


async def _body_refusals() -> None:
    cfg = HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",))
    async with running_host(LOOP) as srv_host, daemon_host(cfg, Identity.generate()) as cli_host:
        strict = AutoNATv2Server(srv_host, AutoNATv2Config(max_requests_per_peer=3))  # no private dials
        async with strict.running():
            client = AutoNATv2Client(cli_host, LOCAL)
            await cli_host.connect(info_from_p2p_addr(srv_host.get_addrs()[0]))
            sid = srv_host.get_id()
            with pytest.raises(AutoNATv2Error, match="E_DIAL_REFUSED"):
                await client.check(sid, [_listen(cli_host, "127.0.0.1")])
            with pytest.raises(AutoNATv2Error, match="no addresses"):
                await client.check(sid, [])

            # garbage on the dial-request stream: reset, counted, the server keeps serving
            s = await cli_host.new_stream(sid, [DIAL_REQUEST])
            await s.write(encode_varint_prefixed(b"\x0f\xff\xff"))
            with trio.fail_after(5), contextlib.suppress(Exception):
                await s.read(10)  # reset
            await _until(lambda: strict.stats["bad"] == 1)
            answers = []
            for _ in range(3):  # one of the 3 requests per window was used above
                try:
                    await client.check(sid, [_listen(cli_host, "127.0.0.1")])
                except AutoNATv2Error as exc:
                    answers.append(str(exc).split()[-1])
            assert answers == ["E_DIAL_REFUSED", "E_DIAL_REFUSED", "E_REQUEST_REJECTED"]

            # a dial-back with a nonce the client never sent is refused
            s = await srv_host.new_stream(cli_host.get_id(), [DIAL_BACK])
            await s.write(encode_varint_prefixed(wire.encode_dial_back(wire.DialBack(12345))))
            with trio.fail_after(5):
                try:
                    answer = await s.read(10)
                except Exception:  # reset: what we expect
                    answer = b""
            assert answer == b""  # no DialBackResponse for a nonce it never sent
            await _until(lambda: client.unknown_nonces == 1)


def test_refusals_rate_limits_garbage_and_foreign_nonces() -> None:
    trio.run(_body_refusals)
