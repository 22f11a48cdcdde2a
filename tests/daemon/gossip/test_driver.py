"""GossipService on real py-libp2p hosts over loopback TCP."""

from __future__ import annotations

import contextlib
import ipaddress
import json

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from meshmerge.daemon.gossip.driver import GossipConfig, GossipService, Validation
from meshmerge.daemon.gossip.params import GossipSubParams, derive_score_params
from meshmerge.daemon.gossip.router import MESHSUB_11
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.proto.gossipsub import RPC, SubOpts, encode_frame
from tests.daemon.gossip.netkit import GNode, gossip_nodes, mesh_ready, wait_for
from tests.daemon.swarmkit import run

TOPIC = "/meshmerge/1/set/test"


def test_two_nodes_deliver_100_each_way() -> None:
    async def body() -> None:
        async with gossip_nodes(2) as (a, b):
            a.join(TOPIC)
            b.join(TOPIC)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            for i in range(100):
                await a.service.publish(TOPIC, b"a%d" % i)
                await b.service.publish(TOPIC, b"b%d" % i)
            await wait_for(
                lambda: len(a.received[TOPIC]) == 100 and len(b.received[TOPIC]) == 100, what="deliveries"
            )
            assert {d for _, d in b.received[TOPIC]} == {b"a%d" % i for i in range(100)}
            assert {d for _, d in a.received[TOPIC]} == {b"b%d" % i for i in range(100)}
            assert all(author == a.pid for author, _ in b.received[TOPIC])
            await trio.sleep(0.5)
            assert len(a.received[TOPIC]) == 100  # no duplicates
            for rows in (a.service.peers(), a.service.scores(), a.service.topics()):
                assert rows and json.loads(json.dumps(rows)) == rows
                assert all(type(v) in (str, int, float, bool) for row in rows for v in row.values())
            (peer,) = a.service.peers()
            assert peer["peer_id"] == b.host.get_id().to_base58() and peer["mesh"] == TOPIC
            assert a.service.topics() == [
                {"topic": TOPIC, "subscribed": True, "peers": 1, "mesh": 1, "fanout": 0}
            ]

    run(body, timeout=60)


def test_plain_validators_run_inline_and_frames_keep_their_order() -> None:
    """A plain validator never parks a message for a worker; 300 x 4 KiB back to back (more than a
    yamux window, so direct writes and the writer task's waiting writes alternate) arrive complete
    and in publish order."""

    async def body() -> None:
        async with gossip_nodes(2) as (a, b):
            a.join(TOPIC, inline=True)
            b.join(TOPIC, inline=True)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            parked = 0
            for i in range(300):
                await a.service.publish(TOPIC, i.to_bytes(4, "big") * 1024)
                parked = max(parked, len(b.service.router.pending))
            await wait_for(lambda: len(b.received[TOPIC]) == 300, what="deliveries", timeout=60)
            order = [int.from_bytes(d[:4], "big") for _, d in b.received[TOPIC]]
            assert order == list(range(300))
            assert parked == 0 and not b.service.router.pending
            assert b.service.stats.delivered == 300 and b.service.stats.validator_errors == 0

    run(body, timeout=120)


def test_a_slow_handler_pauses_reading_instead_of_queueing() -> None:
    """Push-mode reading stops taking a peer's data while max_pending_validations deliveries wait
    for a slow handler; nothing is lost and order is kept."""
    params = GossipSubParams(max_pending_validations=8)
    config = GossipConfig(params=params, max_validation_concurrency=4)

    async def body() -> None:
        async with gossip_nodes(2, config) as (a, b):
            got: list[int] = []

            def validator(author: bytes, data: bytes) -> Validation:
                return Validation.ACCEPT

            async def slow_handler(author: bytes, data: bytes) -> None:
                got.append(int.from_bytes(data[:4], "big"))
                await trio.sleep(0.002)

            b.service.subscribe(TOPIC, validator, slow_handler)
            a.join(TOPIC, inline=True)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            for i in range(200):
                await a.service.publish(TOPIC, i.to_bytes(4, "big") + b"x" * 200)
            await wait_for(lambda: len(got) == 200, what="deliveries", timeout=60)
            assert got == list(range(200))
            assert b.service.stats.read_pauses >= 1

    run(body, timeout=90)


def test_a_plain_validator_that_raises_ignores_the_message() -> None:
    async def body() -> None:
        async with gossip_nodes(2, _scored_config()) as (a, b):
            got: list[bytes] = []

            def validator(author: bytes, data: bytes) -> Validation:
                if data.startswith(b"boom"):
                    raise RuntimeError("validator bug")
                return Validation.ACCEPT

            async def handler(author: bytes, data: bytes) -> None:
                got.append(data)

            a.service.subscribe(TOPIC, validator, handler)
            b.join(TOPIC)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            await b.service.publish(TOPIC, b"boom1")
            await b.service.publish(TOPIC, b"fine")
            await wait_for(lambda: got == [b"fine"], what="the good message")
            assert a.service.stats.validator_errors == 1
            assert a.service.router.peer_score(b.pid) >= 0  # IGNORE costs the forwarder nothing

    run(body, timeout=60)


def _scored_config() -> GossipConfig:
    params, thresholds = derive_score_params(
        {TOPIC: 10.0}, ip_whitelist=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    return GossipConfig(score=params, thresholds=thresholds)


async def _ring(nodes: list[GNode], chords: int) -> None:
    n = len(nodes)
    for i in range(n):
        for k in range(1, chords + 1):
            await nodes[i].host.connect(nodes[(i + k) % n].info)


def test_ten_node_mesh_delivers_100_to_every_node() -> None:
    async def body() -> None:
        async with gossip_nodes(10, _scored_config()) as nodes:
            for node in nodes:
                node.join(TOPIC)
            await _ring(nodes, 3)
            await wait_for(lambda: mesh_ready(nodes, TOPIC, 4), what="mesh degree 4 everywhere")
            for publisher in (nodes[0], nodes[5]):
                for i in range(100):
                    await publisher.service.publish(TOPIC, publisher.pid[-4:] + b"%d" % i)
            want_from = {nodes[0].pid: 100, nodes[5].pid: 100}

            def complete() -> bool:
                for node in nodes:
                    got = node.received[TOPIC]
                    expect = sum(c for p, c in want_from.items() if p != node.pid)
                    if len(got) < expect:
                        return False
                return True

            await wait_for(complete, timeout=30, what="100/100 at every node")
            await trio.sleep(1.0)
            for node in nodes:
                got = node.received[TOPIC]
                expect = sum(c for p, c in want_from.items() if p != node.pid)
                assert len(got) == expect == len(set(got)), "no loss and no duplicates"
            for node in nodes:
                for row in node.service.scores():
                    assert row["score"] >= 0, row

    run(body, timeout=90)


@pytest.mark.parametrize("inline", [False, True], ids=["async-validator", "plain-validator"])
def test_rejected_messages_cost_the_sender_p4(inline: bool) -> None:
    async def body() -> None:
        async with gossip_nodes(2, _scored_config()) as (a, b):
            a.join(TOPIC, verdict=Validation.REJECT, inline=inline)
            b.join(TOPIC)
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            for i in range(5):
                await b.service.publish(TOPIC, b"bad%d" % i)
            counters = lambda: a.service.router.score.topic_counters(b.pid, TOPIC)  # noqa: E731
            await wait_for(lambda: counters().get("invalid_deliveries", 0) >= 5, what="P4 counted")
            assert a.received[TOPIC] == []
            assert a.service.router.peer_score(b.pid) < 0
            row = next(r for r in a.service.scores() if r["peer_id"] == b.host.get_id().to_base58())
            assert row[f"{TOPIC}:invalid_deliveries"] >= 5 and row["score"] < 0
            # the honest direction still works and B's view of A is untouched
            await a.service.publish(TOPIC, b"fine")
            await wait_for(lambda: b.received[TOPIC] == [(a.pid, b"fine")], what="A -> B delivery")
            assert b.service.router.peer_score(a.pid) >= 0

    run(body, timeout=60)


def test_app_score_hook_moves_the_score() -> None:
    async def body() -> None:
        async with gossip_nodes(2, _scored_config()) as (a, b):
            await a.host.connect(b.info)
            await wait_for(lambda: b.pid in a.service.router.peers, what="peer added")
            a.service.set_app_score(b.pid, -250.0)
            assert a.service.router.peer_score(b.pid) == -250.0
            row = next(r for r in a.service.scores() if r["peer_id"] == b.host.get_id().to_base58())
            assert row["app_score"] == -250.0
            a.service.set_app_score(b.pid, 0.0)
            assert a.service.router.peer_score(b.pid) == 0.0

    run(body, timeout=60)


def test_garbage_frames_drop_the_peer_and_the_node_stays_up() -> None:
    async def body() -> None:
        async with gossip_nodes(2) as (a, c), running_host(HostConfig(), Identity.generate()) as evil:
            a.join(TOPIC)
            c.join(TOPIC)

            async def sink(stream: INetStream) -> None:
                with contextlib.suppress(Exception):
                    while await stream.read(65536):
                        pass

            evil.set_stream_handler(TProtocol(MESHSUB_11), sink)
            await evil.connect(a.info)
            stream = await evil.new_stream(a.host.get_id(), [TProtocol(MESHSUB_11)])
            # a well-formed length prefix followed by bytes that are not a protobuf RPC
            await stream.write(b"\x05\xff\xff\xff\xff\xff")
            await wait_for(lambda: not a.host.get_network().get_connections(evil.get_id()), what="drop")
            assert a.service.stats.bad_frames == 1
            assert evil.get_id().to_bytes() not in a.service.router.peers
            # an oversized frame announcement is refused before it is buffered
            await evil.connect(a.info)
            stream = await evil.new_stream(a.host.get_id(), [TProtocol(MESHSUB_11)])
            await stream.write(b"\xff\xff\xff\xff\x0f")
            await wait_for(lambda: not a.host.get_network().get_connections(evil.get_id()), what="drop 2")
            assert a.service.stats.bad_frames == 2
            await a.host.connect(c.info)
            await wait_for(lambda: mesh_ready([a, c], TOPIC, 1), what="mesh")
            await a.service.publish(TOPIC, b"still here")
            await wait_for(lambda: c.received[TOPIC] == [(a.pid, b"still here")], what="delivery")

    run(body, timeout=60)


def test_publish_before_any_peer_is_not_replayed_later_ones_are() -> None:
    """A message published with no peers reaches nobody (as in go-libp2p-pubsub).

    Flood publishing sends only to peers known at publish time; when a peer then
    arrives it joins the mesh, and IHAVE gossip goes to non-mesh peers only, so the
    message is not repaired by gossip. meshmerge's anti-entropy repairs it.
    """

    async def body() -> None:
        async with gossip_nodes(2) as (a, b):
            a.join(TOPIC)
            b.join(TOPIC)
            await a.service.publish(TOPIC, b"early")
            await a.host.connect(b.info)
            await wait_for(lambda: mesh_ready([a, b], TOPIC, 1), what="mesh")
            await a.service.publish(TOPIC, b"late")
            await wait_for(lambda: (a.pid, b"late") in b.received[TOPIC], what="late delivery")
            await trio.sleep(3 * a.service.config.params.heartbeat_interval)
            assert b.received[TOPIC] == [(a.pid, b"late")]

    run(body, timeout=60)


def test_fanout_publish_without_subscribing() -> None:
    async def body() -> None:
        async with gossip_nodes(3) as (a, b, c):
            b.join(TOPIC)
            c.join(TOPIC)
            await a.host.connect(b.info)
            await a.host.connect(c.info)
            await wait_for(
                lambda: len(a.service.router.topics.get(TOPIC, ())) == 2, what="subscriptions seen"
            )
            for i in range(20):
                await a.service.publish(TOPIC, b"f%d" % i)
            await wait_for(
                lambda: len(b.received[TOPIC]) == 20 and len(c.received[TOPIC]) == 20, what="fanout"
            )
            assert any(t["topic"] == TOPIC and not t["subscribed"] for t in a.service.topics())

    run(body, timeout=60)


def test_clean_shutdown_leaves_no_tasks() -> None:
    async def body() -> None:
        async with gossip_nodes(1) as (peer,):
            peer.join(TOPIC)
            ident = Identity.generate()
            async with running_host(HostConfig(), ident) as host:
                svc = GossipService(host, ident, GossipConfig())
                box: list[bytes] = []

                async def validator(author: bytes, data: bytes) -> Validation:
                    return Validation.ACCEPT

                async def handler(author: bytes, data: bytes) -> None:
                    box.append(data)

                svc.subscribe(TOPIC, validator, handler)
                async with trio.open_nursery() as nursery:
                    await nursery.start(svc.run)
                    await host.connect(peer.info)
                    await wait_for(lambda: len(svc.router.mesh.get(TOPIC, ())) == 1, what="mesh")
                    await peer.service.publish(TOPIC, b"x")
                    await wait_for(lambda: box == [b"x"], what="delivery")
                    assert svc._readers and svc._peers
                    assert len(_tasks_of(svc)) > 3  # the check below sees real tasks
                    nursery.cancel_scope.cancel()
                assert not svc._peers and not svc._readers and not svc.router.peers
                await trio.sleep(0.2)
                assert _tasks_of(svc) == []
                # a second run on the same service works (handlers re-registered)
                async with trio.open_nursery() as nursery:
                    await nursery.start(svc.run)
                    await wait_for(lambda: len(svc.router.peers) == 1, what="peer re-added after restart")
                    nursery.cancel_scope.cancel()

    run(body, timeout=60)


def _tasks_of(svc: GossipService) -> list[str]:
    """Live tasks running (at any await depth) a method of ``svc``, in any nursery."""
    found: list[str] = []
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        coro: object = task.coro
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None and frame.f_locals.get("self") is svc:
                found.append(task.name)
                break
            coro = getattr(coro, "cr_await", None)
        stack.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return found


def test_a_peer_that_stops_reading_is_dropped() -> None:
    """A subscriber that never reads fills its yamux window, then our queue: we drop it."""
    params = GossipSubParams(max_peer_queue_messages=8)
    config = GossipConfig(params=params, write_timeout=1.0, publish_wait_timeout=0.05)

    async def body() -> None:
        async with gossip_nodes(2, config) as (a, c), running_host(HostConfig(), Identity.generate()) as evil:
            a.join(TOPIC)
            c.join(TOPIC)
            stalled = trio.Event()

            async def never_read(stream: INetStream) -> None:
                await stalled.wait()

            evil.set_stream_handler(TProtocol(MESHSUB_11), never_read)
            await evil.connect(a.info)
            stream = await evil.new_stream(a.host.get_id(), [TProtocol(MESHSUB_11)])
            await stream.write(encode_frame(RPC(subscriptions=[SubOpts(True, TOPIC)])))
            await a.host.connect(c.info)
            evil_pid = evil.get_id().to_bytes()
            await wait_for(lambda: evil_pid in a.service.router.topics.get(TOPIC, ()), what="evil subscribed")
            await wait_for(lambda: mesh_ready([a, c], TOPIC, 1), what="mesh with the honest peer")
            payload = b"x" * 4096
            with trio.move_on_after(20):
                i = 0
                while a.host.get_network().get_connections(evil.get_id()):
                    await a.service.publish(TOPIC, payload + b"%d" % i)
                    i += 1
                    if i % 16 == 0:
                        await trio.sleep(0.01)
            assert not a.host.get_network().get_connections(evil.get_id()), "slow peer was not dropped"
            assert a.service.stats.disconnects >= 1
            assert evil_pid not in a.service.router.peers
            await wait_for(lambda: len(c.received[TOPIC]) == i, timeout=30, what="honest peer got everything")
            stalled.set()

    run(body, timeout=90)


def test_direct_peers_are_dialed_and_always_forwarded_to() -> None:
    async def body() -> None:
        ia, ib = Identity.generate(), Identity.generate()
        async with (
            running_host(HostConfig(), ia) as ha,
            running_host(HostConfig(), ib) as hb,
            trio.open_nursery() as nursery,
        ):
            b_addr = str(hb.get_addrs()[0])
            a = GNode(ia, ha, GossipService(ha, ia, GossipConfig(direct_peers=(b_addr,))))
            b = GNode(ib, hb, GossipService(hb, ib, GossipConfig()))
            a.join(TOPIC)
            b.join(TOPIC)
            await nursery.start(b.service.run)
            await nursery.start(a.service.run)  # dials b by itself
            await wait_for(lambda: b.pid in a.service.router.topics.get(TOPIC, ()), what="direct peer up")
            assert b.pid not in a.service.router.mesh.get(TOPIC, set())  # direct peers stay out of the mesh
            assert any(p["direct"] for p in a.service.peers())
            await a.service.publish(TOPIC, b"direct")
            await wait_for(
                lambda: b.received[TOPIC] == [(a.pid, b"direct")], what="delivery to a direct peer"
            )
            nursery.cancel_scope.cancel()

    run(body, timeout=60)


def test_a_peer_that_resets_our_stream_is_retried_a_bounded_number_of_times() -> None:
    config = GossipConfig(stream_retry_limit=2)

    async def body() -> None:
        async with gossip_nodes(1, config) as (a,), running_host(HostConfig(), Identity.generate()) as evil:
            a.join(TOPIC)
            opened: list[float] = []

            async def reset_it(stream: INetStream) -> None:
                opened.append(trio.current_time())
                await trio.sleep(0.3)  # after the opener's negotiation: an idle stream that dies
                await stream.reset()

            evil.set_stream_handler(TProtocol(MESHSUB_11), reset_it)
            await evil.connect(a.info)
            await wait_for(lambda: len(opened) >= 3, timeout=15, what="reopened after resets")
            await trio.sleep(3 * a.service.config.params.heartbeat_interval)
            assert len(opened) == 3  # first try + stream_retry_limit retries, then it gives up
            assert a.host.get_network().get_connections(evil.get_id())  # the connection itself is left alone
            assert evil.get_id().to_bytes() not in a.service.router.peers

    run(body, timeout=60)
