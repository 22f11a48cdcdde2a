"""Probe of py-libp2p 0.8.1's QUIC (/quic-v1) on loopback: what works, and the shortfall that
keeps it out of meshmerge's host (README "QUIC"; issue 5).

Works: connect, streams both ways on a live connection, 20 concurrent streams, ping,
identify. Broken: when the dialer closes a QUIC connection, the listener does not notice —
a second later its swarm still lists the connection as open — so the listener's next stream
to that peer goes to the dead connection and fails instead of dialing a fresh one. The same
sequence over TCP works. (Where the close gets lost inside py-libp2p's QUIC listener/connection
event handling was not established.)
If a py-libp2p upgrade fixes this, ``test_listener_side_stream_after_dialer_closed_*``
fails on the QUIC case and QUIC can be reconsidered.
"""

from __future__ import annotations

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import PingService
from libp2p.peer.peerinfo import info_from_p2p_addr

ECHO = TProtocol("/meshmerge/test/echo/1")
QUIC = "/ip4/127.0.0.1/udp/0/quic-v1"
TCP = "/ip4/127.0.0.1/tcp/0"


async def _echo(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


def _pair(listen: str):  # type: ignore[no-untyped-def]
    addrs = [multiaddr.Multiaddr(listen)]
    quic = "quic" in listen
    a = new_host(key_pair=create_new_key_pair(), listen_addrs=addrs, enable_quic=quic)
    b = new_host(key_pair=create_new_key_pair(), listen_addrs=addrs, enable_quic=quic)
    return a, b, addrs


async def _exchange(src, dst, payload: bytes) -> bytes:  # type: ignore[no-untyped-def]
    s = await src.new_stream(dst.get_id(), [ECHO])
    await s.write(payload)
    got = b""
    while len(got) < len(payload):
        chunk = await s.read(65536)
        if not chunk:
            break
        got += chunk
    await s.close()
    return got


def test_quic_basics_work() -> None:
    async def body() -> None:
        a, b, addrs = _pair(QUIC)
        async with a.run(addrs), b.run(addrs):
            assert "/udp/" in str(b.get_addrs()[0]) and "/quic-v1/" in str(b.get_addrs()[0])
            a.set_stream_handler(ECHO, _echo)
            b.set_stream_handler(ECHO, _echo)
            with trio.fail_after(30):
                await a.connect(info_from_p2p_addr(b.get_addrs()[0]))
                assert await _exchange(a, b, b"a to b") == b"a to b"
                assert await _exchange(b, a, b"b to a") == b"b to a"  # same live connection
                results: list[bytes] = []

                async def one(i: int) -> None:
                    results.append(await _exchange(a, b, bytes([i]) * (1000 + i)))

                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(one, i)
                assert sorted(results) == sorted(bytes([i]) * (1000 + i) for i in range(20))
                await PingService(a).ping(b.get_id(), ping_amt=3)

    trio.run(body)


@pytest.mark.parametrize("listen", [TCP, QUIC], ids=["tcp", "quic"])
def test_listener_side_stream_after_dialer_closed_the_connection(listen: str) -> None:
    """A dials B, then closes; B opens a stream to A. TCP: B dials anew and it works.
    QUIC (py-libp2p 0.8.1): B still holds the dead connection and the stream fails."""
    outcome: list[str] = []

    async def body() -> None:
        a, b, addrs = _pair(listen)
        async with a.run(addrs), b.run(addrs):
            a.set_stream_handler(ECHO, _echo)
            with trio.fail_after(30):
                await a.connect(info_from_p2p_addr(b.get_addrs()[0]))
                await trio.sleep(0.3)
                await a.disconnect(b.get_id())
                await trio.sleep(1.0)  # plenty on loopback for the close to arrive
                stale = [c for c in b.get_network().get_connections(a.get_id()) if not c.is_closed]
                outcome.append(f"{len(stale)} open")
                try:
                    with trio.fail_after(10):
                        got = await _exchange(b, a, b"again")
                    outcome.append("ok" if got == b"again" else "wrong data")
                except Exception as exc:
                    outcome.append(type(exc).__name__)

    trio.run(body)
    if listen == TCP:
        assert outcome == ["0 open", "ok"]
    else:
        assert outcome == ["1 open", "StreamFailure"], outcome  # the shortfall; see the docstring
