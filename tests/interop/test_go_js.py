"""Independent go-libp2p and js-libp2p peers interoperate through the harness.

This is the reference the meshmerge host and router are held to: whatever the
two independent implementations do with each other on loopback, ours must do
with each of them.
"""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID

from meshmerge.testing.interop import run_trio, wait_until
from meshmerge.testing.interop.common import PubsubMessage, pk_record, raw_cid
from meshmerge.testing.interop.gopeer import (
    GO_MESH_SETTLE,
    DaemonError,
    GoPeer,
    Subscription,
    provide_when_routable,
    start_go_peer,
)
from meshmerge.testing.interop.jspeer import JsPeer, JsPeerError, JsSubscription, start_js_peer
from meshmerge.testing.interop.pyhost import start_stock_py_host
from meshmerge.testing.interop.tools import InteropTools

pytestmark = pytest.mark.interop

N_MESSAGES = 100


async def _connect(go: GoPeer, js: JsPeer, direction: str) -> None:
    if direction == "js_dials_go":
        await js.dial(go.p2p_addrs[0])
    else:
        await go.connect(js.peer_id, js.addrs)
    await wait_until(lambda: _connected(go, js), what="go and js both list the connection")


async def _connected(go: GoPeer, js: JsPeer) -> bool:
    return (
        js.peer_id in [p.peer_id for p in await go.list_peers()] and go.peer_id in await js.connected_peers()
    )


@pytest.mark.parametrize("direction", ["js_dials_go", "go_dials_js"])
def test_go_js_connect_identify_ping(interop_tools: InteropTools, direction: str) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_js_peer(interop_tools) as js:
            await _connect(go, js, direction)

            go_seen_by_js = await js.identify_remote(go.peer_id)
            assert "/ipfs/kad/1.0.0" in go_seen_by_js.protocols
            assert "/meshsub/1.1.0" in go_seen_by_js.protocols
            assert go_seen_by_js.agent_version
            js_seen_by_go = await go.identify_remote(js.peer_id)
            assert "/meshsub/1.2.0" in js_seen_by_go.protocols
            assert "/ipfs/kad/1.0.0" in js_seen_by_go.protocols
            assert js_seen_by_go.agent_version.startswith("js-libp2p/")

            assert all(0 < rtt < 5 for rtt in await js.ping(go.peer_id, count=3))
            assert all(0 < rtt < 5 for rtt in await go.ping(js.peer_id, count=3))

    run_trio(body, timeout=60)


async def _drain(
    sub: Subscription | JsSubscription, n: int, sender: ID, timeout: float
) -> list[PubsubMessage]:
    """Up to `n` messages from `sender` (p2pd also delivers the go peer's own publishes)."""
    got: list[PubsubMessage] = []
    with trio.move_on_after(timeout):
        while len(got) < n:
            msg = await sub.receive()
            if msg.from_peer == sender:
                got.append(msg)
    return got


def test_go_js_gossip_100_messages_each_way(interop_tools: InteropTools) -> None:
    topic = "meshmerge-interop-gossip"

    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_js_peer(interop_tools) as js:
            await _connect(go, js, "js_dials_go")
            js_sub = await js.subscribe(topic)
            async with go.subscribe(topic) as go_sub:

                async def both_see_each_other() -> bool:
                    return js.peer_id in await go.pubsub_list_peers(
                        topic
                    ) and go.peer_id in await js.topic_peers(topic)

                await wait_until(both_see_each_other, what="topic subscriptions exchanged")
                await trio.sleep(GO_MESH_SETTLE)

                sent = [b"go->js %03d" % i for i in range(N_MESSAGES)]
                for payload in sent:
                    await go.pubsub_publish(topic, payload)
                got = await _drain(js_sub, N_MESSAGES, go.peer_id, timeout=20)
                assert sorted(m.data for m in got) == sorted(sent), f"js received {len(got)}/{N_MESSAGES}"

                sent = [b"js->go %03d" % i for i in range(N_MESSAGES)]
                for payload in sent:
                    await js.publish(topic, payload)
                got = await _drain(go_sub, N_MESSAGES, js.peer_id, timeout=20)
                assert sorted(m.data for m in got) == sorted(sent), f"go received {len(got)}/{N_MESSAGES}"
                assert js.dropped_messages == 0
                assert await js.score(go.peer_id) >= 0
                stats = (await js.score_stats())[go.peer_id.to_base58()]
                assert stats["connected"] and stats["behaviourPenalty"] == 0

    run_trio(body, timeout=90)


def test_go_js_dht_provide_find_both_ways(interop_tools: InteropTools) -> None:
    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_js_peer(interop_tools) as js:
            await _connect(go, js, "go_dials_js")
            await wait_until(
                lambda: _js_routing_table_nonempty(js), what="js routing table holds the go peer"
            )

            from_js = raw_cid(b"provided by js")
            await js.dht_provide(from_js)
            providers = await go.dht_find_providers(from_js, count=1)
            assert [p.peer_id for p in providers] == [js.peer_id]
            assert providers[0].addrs

            from_go = raw_cid(b"provided by go")
            await provide_when_routable(go, from_go)
            providers = await js.dht_find_providers(from_go, count=1, timeout=20)
            assert [p.peer_id for p in providers] == [go.peer_id]

            assert (await js.dht_find_peer(go.peer_id)).peer_id == go.peer_id
            assert (await go.dht_find_peer(js.peer_id)).peer_id == js.peer_id

    run_trio(body, timeout=90)


def test_go_js_dht_put_get_pk_records_both_ways(interop_tools: InteropTools) -> None:
    """Value records cross between go and js via the `/pk/` namespace (go accepts only /pk/ and /ipns/)."""

    async def body() -> None:
        async with start_go_peer(interop_tools) as go, start_js_peer(interop_tools) as js:
            await _connect(go, js, "js_dials_go")
            await wait_until(
                lambda: _js_routing_table_nonempty(js), what="js routing table holds the go peer"
            )

            key, value = pk_record()
            await _go_put_when_routable(go, key, value)
            assert await js.dht_get(key, timeout=20) == value

            key, value = pk_record()
            await js.dht_put(key, value)
            assert await go.dht_get_value(key) == value

            key, value = pk_record()
            with pytest.raises(DaemonError, match="public key does not match"):
                await go.dht_put_value(key, value[:-1] + bytes([value[-1] ^ 1]))

    run_trio(body, timeout=90)


async def _go_put_when_routable(go: GoPeer, key: bytes, value: bytes, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                await go.dht_put_value(key, value)
                return
            except DaemonError as exc:
                if "failed to find any peer" not in str(exc):
                    raise
            await trio.sleep(0.05)


async def _js_routing_table_nonempty(js: JsPeer) -> bool:
    return await js.dht_routing_table_size() > 0


def test_js_meshmerge_namespace_put_get_and_validator(interop_tools: InteropTools) -> None:
    """js peers store and serve /meshmerge/ records and refuse ones their validator rejects."""

    async def body() -> None:
        async with start_js_peer(interop_tools) as a, start_js_peer(interop_tools) as b:
            await a.dial(b.p2p_addrs[0])
            await wait_until(lambda: _js_routing_table_nonempty(a), what="a's routing table holds b")
            await wait_until(lambda: _js_routing_table_nonempty(b), what="b's routing table holds a")
            key = b"/meshmerge/interop-test"
            await a.dht_put(key, b"record-1")
            assert await b.dht_get(key, timeout=20) == b"record-1"
            await b.dht_put(key, b"record-2")
            assert await a.dht_get(key, timeout=20) == b"record-2"

            await a.dht_put(b"/meshmerge/empty", b"")  # a stores it locally; b's validator refuses it
            with pytest.raises(JsPeerError, match="found nothing"):
                await b.dht_get(b"/meshmerge/empty", timeout=2)

    run_trio(body, timeout=90)


def test_ipv6_loopback_go_js_and_stock_py(interop_tools: InteropTools) -> None:
    """All three kinds listen and dial on ::1 as well."""

    async def body() -> None:
        async with (
            start_go_peer(interop_tools, host="::1") as go,
            start_js_peer(interop_tools, host="::1") as js,
            start_stock_py_host(host="::1") as py,
        ):
            assert all(str(a).startswith("/ip6/::1/tcp/") for a in [*go.addrs, *js.addrs, *py.addrs])
            await js.dial(go.p2p_addrs[0])
            await py.connect(go.peer_id, go.addrs)
            await py.connect(js.peer_id, js.addrs)
            assert len(await go.ping(js.peer_id, count=2)) == 2
            assert len(await py.ping(go.peer_id, count=2)) == 2
            assert len(await py.ping(js.peer_id, count=2)) == 2

    run_trio(body, timeout=60)
