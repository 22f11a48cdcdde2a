"""The go-libp2p daemon driver works, and a stock py-libp2p host interoperates with it.

These pin down the harness itself (control protocol, streams, DHT, pubsub) so
that the host and gossip work can build on it, and record what stock
py-libp2p 0.8.1 does against go over real loopback TCP.
"""

from __future__ import annotations

import pytest
import trio

from meshmerge.testing.interop import run_trio
from meshmerge.testing.interop.common import raw_cid
from meshmerge.testing.interop.framing import BufferedStream
from meshmerge.testing.interop.gopeer import (
    GO_MESH_SETTLE,
    DaemonError,
    GoPeer,
    StreamInfo,
    provide_when_routable,
    start_go_peer,
)
from meshmerge.testing.interop.pyhost import start_stock_py_host
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop


def test_go_daemon_identify_connect_stream_handler(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as a, start_go_peer(interop_tools) as b:
            assert a.peer_id != b.peer_id
            assert all(str(addr).startswith("/ip4/127.0.0.1/tcp/") for addr in a.addrs)
            await a.connect(b.peer_id, b.addrs)
            assert b.peer_id in [p.peer_id for p in await a.list_peers()]

            seen: list[StreamInfo] = []

            async def reverse(info: StreamInfo, stream: BufferedStream) -> None:
                seen.append(info)
                await stream.send_all((await stream.read_exactly(5))[::-1])

            await b.set_stream_handler(["/mm-test/echo/1"], reverse)
            info, stream = await a.open_stream(b.peer_id, ["/mm-test/echo/1"])
            await stream.send_all(b"hello")
            assert await stream.read_exactly(5) == b"olleh"
            await stream.aclose()
            assert info.protocol == "/mm-test/echo/1"
            assert [s.peer_id for s in seen] == [a.peer_id]

            with pytest.raises(DaemonError, match="STREAM_OPEN"):
                await a.open_stream(b.peer_id, ["/mm-test/nobody-speaks-this/1"], timeout=5)

    run_trio(body, timeout=60)


def test_go_daemon_pubsub_and_dht_between_two_go_peers(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as a, start_go_peer(interop_tools) as b:
            await a.connect(b.peer_id, b.addrs)
            async with a.subscribe("mm-t"), b.subscribe("mm-t") as sub:
                await _wait_topic_peer(a, "mm-t", b)
                await _wait_topic_peer(b, "mm-t", a)
                # A subscribed p2pd publishes to its mesh only; the mesh forms on its 1 s heartbeat.
                await trio.sleep(GO_MESH_SETTLE)
                for i in range(10):
                    await a.pubsub_publish("mm-t", b"m%d" % i)
                got = [await sub.receive() for _ in range(10)]
                assert sorted(m.data for m in got) == sorted(b"m%d" % i for i in range(10))
                assert {m.from_peer for m in got} == {a.peer_id}
                assert "mm-t" in await b.pubsub_get_topics()

            cid = raw_cid(b"go-go provide")
            await provide_when_routable(a, cid)
            providers = await b.dht_find_providers(cid, count=1)
            assert a.peer_id in [p.peer_id for p in providers]
            found = await b.dht_find_peer(a.peer_id)
            assert found.peer_id == a.peer_id and found.addrs

            with pytest.raises(DaemonError, match="PUT_VALUE"):
                await a.dht_put_value(b"/meshmerge/x", b"v", timeout=5)

    run_trio(body, timeout=90)


async def _wait_topic_peer(peer: GoPeer, topic: str, other: GoPeer, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while other.peer_id not in await peer.pubsub_list_peers(topic):
            await trio.sleep(0.05)


@pytest.mark.parametrize("direction", ["py_dials_go", "go_dials_py"])
def test_stock_py_libp2p_host_and_go_identify_and_ping(interop_tools: InteropTools, direction: str) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_stock_py_host() as py:
            if direction == "py_dials_go":
                await py.connect(go.peer_id, go.addrs)
            else:
                await go.connect(py.peer_id, py.addrs)

            assert "/ipfs/kad/1.0.0" in await py.identified_protocols(go.peer_id)  # py's own identify
            go_seen_by_py = await py.identify_remote(go.peer_id)
            assert "/ipfs/kad/1.0.0" in go_seen_by_py.protocols
            assert "/meshsub/1.1.0" in go_seen_by_py.protocols
            assert go_seen_by_py.agent_version

            py_seen_by_go = await go.identify_remote(py.peer_id)
            assert "/ipfs/ping/1.0.0" in py_seen_by_go.protocols
            assert "/ipfs/id/1.0.0" in py_seen_by_go.protocols

            assert len(await py.ping(go.peer_id, count=3)) == 3
            assert len(await go.ping(py.peer_id, count=3)) == 3

    run_trio(body, timeout=60)
