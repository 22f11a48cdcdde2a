"""GossipSub on a real 10-node loopback mesh: meshmerge vs stock py-libp2p vs go, in one run.

Per implementation, a fresh mesh of NODES nodes on 127.0.0.1 (TCP, Noise, yamux),
each node dialing the next CHORDS nodes round a ring (degree 2*CHORDS), all
subscribed to one topic. After every node sees >= 3 topic peers and the mesh
settles, MESSAGES messages of SIZE bytes are published round-robin by the nodes
(message i by node i mod NODES), either back to back ("burst") or one every
PACE_MS ms ("paced"). Each message should reach the NODES-1 other nodes.

Reported: delivered/expected within DELIVERY_WAIT s of the last publish,
messages/s (messages published / time from first publish to last delivery),
p50/p99 latency from the publish call to receipt, and CPU ms per message: CPU
time (user + system) the node processes spent from the first publish to the
last receipt, divided by the messages published (for the in-process rows,
this Python process's CPU time, harness included). Receipt time: in the
handler for meshmerge, when the subscription reader takes it for stock
py-libp2p, when the Python driver reads it off p2pd's control socket for go
(all CLOCK_MONOTONIC; the send time travels in the payload).

Implementations:
- ours: meshmerge GossipService (driver + sans-I/O router), derived peer-score
  parameters (127.0.0.0/8 whitelisted for P6), plain (inline) accept-all validator.
- ours-procs: the same, one OS process per node (meshmerge/testing/gossip_node.py,
  GC tuned as the daemon does); each round's stderr line adds the nodes' GC
  collections during the measurement and, with GOSSIP_NODE_STEPS=1, trio task
  steps and scheduler I/O waits per message (all ten nodes).
- stock-default: py-libp2p 0.8.1 GossipSub as a new user configures it (only
  D=6/Dlo=4/Dhi=12 given; heartbeat 120 s, 10 msg/s per-topic limit).
- stock-tuned: the same plus heartbeat_interval=1 (the spec default) and the
  per-topic rate limit raised to 1e6 msg/s (go has no such limit), eclipse
  protection off (every node has the same IP on loopback). Fair tuning: these
  are the knobs a user reading the spec would change.
- go: 10 p2pd processes (go-libp2p-pubsub, gossipsub defaults), driven over
  their control sockets.

Caveat: the ten meshmerge / stock py-libp2p nodes share ONE Python process (one
core, one GIL); the ten go nodes are ten processes on both cores.

Run: scripts/bench/run gossip_net
Sizes: GOSSIP_NET_NODES (10), GOSSIP_NET_MESSAGES (100), GOSSIP_NET_SIZE (256),
GOSSIP_NET_PACE_MS (10), GOSSIP_NET_IMPLS (ours-procs,ours,stock-default,stock-tuned,go),
GOSSIP_NET_ROUNDS (3): each implementation and publishing pattern runs on ROUNDS fresh
meshes, round by round, the implementation order reversed every other round; the
table gives the median p99 over rounds, its min-max, and the min-max of the
per-round ratio to go's p99 in the same round. One p99 over ~900 samples is noisy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service.context import background_trio_service
from multiaddr import Multiaddr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import machine, table

from meshmerge.daemon.gossip.driver import GossipConfig, GossipService, Validation
from meshmerge.daemon.gossip.params import derive_score_params
from meshmerge.daemon.host import HostConfig, running_host
from meshmerge.daemon.identity import Identity
from meshmerge.testing.interop.gopeer import GO_MESH_SETTLE, start_go_peer
from meshmerge.testing.interop.pyhost import (
    GOSSIPSUB_V10,
    GOSSIPSUB_V11,
    GOSSIPSUB_V12,
    new_noise_only_host,
    new_stock_gossipsub,
)
from meshmerge.testing.interop.tools import InteropTools, ensure_tools

NODES = int(os.environ.get("GOSSIP_NET_NODES", "10"))
MESSAGES = int(os.environ.get("GOSSIP_NET_MESSAGES", "100"))
SIZE = int(os.environ.get("GOSSIP_NET_SIZE", "256"))
PACE_MS = float(os.environ.get("GOSSIP_NET_PACE_MS", "10"))
IMPLS = os.environ.get("GOSSIP_NET_IMPLS", "ours-procs,ours,stock-default,stock-tuned,go").split(",")
ROUNDS = int(os.environ.get("GOSSIP_NET_ROUNDS", "3"))
ATTEMPTS = 2  # a mesh that fails before measuring (e.g. a p2pd control error) is rebuilt once
CHORDS = 3
DELIVERY_WAIT = 15.0
MESH_WAIT = 20.0
TOPIC = "/meshmerge/1/set/bench"
HEADER = struct.Struct(">IQ")  # message index, send time (monotonic ns)


@dataclass
class Node:
    """One node of any implementation behind publish + a receipt log."""

    peer_id: ID
    addrs: list[Multiaddr]
    publish: Callable[[bytes], Awaitable[None]]
    topic_peers: Callable[[], Awaitable[int]]
    receipts: list[tuple[int, float]] = field(default_factory=list)  # (index, latency s)

    def record(self, data: bytes, at: float) -> None:
        if len(data) >= HEADER.size:
            index, sent_ns = HEADER.unpack_from(data)
            self.receipts.append((index, at - sent_ns / 1e9))


@dataclass
class Mesh:
    nodes: list[Node]
    connect: Callable[[int, int], Awaitable[None]]
    settle: float
    mesh_ready: Callable[[], Awaitable[bool]] | None = None
    received: Callable[[], Awaitable[int]] | None = None  # default: receipts recorded in-process
    collect: Callable[[], Awaitable[None]] | None = None  # fetch receipts recorded elsewhere
    pids: list[int] = field(default_factory=list)  # node processes; empty: nodes run in this process
    start: Callable[[], Awaitable[None]] | None = None  # called as the measurement starts
    report: Callable[[], Awaitable[dict[str, Any]]] | None = None  # extra figures for the round's line


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (this process when empty), from /proc."""
    if not pids:
        return time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


# ------------------------------------------------------------------ meshmerge


@asynccontextmanager
async def ours_mesh(n: int) -> AsyncIterator[Mesh]:
    score, thresholds = derive_score_params(
        {TOPIC: 100.0}, ip_whitelist=(ipaddress.ip_network("127.0.0.0/8"),)
    )
    config = GossipConfig(score=score, thresholds=thresholds)
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes: list[Node] = []
        services: list[GossipService] = []
        hosts = []
        for _ in range(n):
            ident = Identity.generate()
            host = await stack.enter_async_context(running_host(HostConfig(), ident))
            svc = GossipService(host, ident, config)
            await nursery.start(svc.run)

            def make(svc: GossipService = svc, host: Any = host) -> Node:
                async def publish(data: bytes) -> None:
                    await svc.publish(TOPIC, data)

                async def topic_peers() -> int:
                    return len(svc.router.topics.get(TOPIC, ()))

                return Node(host.get_id(), list(host.get_addrs()), publish, topic_peers)

            node = make()

            def validator(author: bytes, data: bytes) -> Validation:  # plain: runs inline
                return Validation.ACCEPT

            async def handler(author: bytes, data: bytes, node: Node = node) -> None:
                node.record(data, time.monotonic())

            svc.subscribe(TOPIC, validator, handler)
            nodes.append(node)
            services.append(svc)
            hosts.append(host)

        async def connect(i: int, j: int) -> None:
            await hosts[i].connect(PeerInfo(nodes[j].peer_id, nodes[j].addrs))

        async def ready() -> bool:
            return all(len(s.router.mesh.get(TOPIC, ())) >= 4 for s in services)

        yield Mesh(nodes, connect, settle=0.5, mesh_ready=ready)


# ------------------------------------------------------------------ meshmerge, one process per node


class _Child:
    """A meshmerge.testing.gossip_node process spoken to over JSON lines."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._buf = b""
        self._lock = trio.Lock()

    async def _line(self) -> Any:
        assert self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(1 << 20)
            if not chunk:
                raise RuntimeError("gossip node process exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def call(self, **req: Any) -> Any:
        assert self.proc.stdin is not None
        async with self._lock:
            await self.proc.stdin.send_all(json.dumps(req).encode() + b"\n")
            return await self._line()


@asynccontextmanager
async def ours_proc_mesh(n: int) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        children: list[_Child] = []
        try:
            nodes: list[Node] = []
            for _ in range(n):
                proc = await nursery.start(
                    partial(
                        trio.run_process,
                        [sys.executable, "-m", "meshmerge.testing.gossip_node", TOPIC],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        check=False,
                    )
                )
                child = _Child(proc)
                children.append(child)
                with trio.fail_after(30):
                    ready = await child._line()

                def make(child: _Child = child, ready: dict[str, Any] = ready) -> Node:
                    async def publish(data: bytes) -> None:
                        index = HEADER.unpack_from(data)[0]
                        await child.call(op="publish", index=index, size=len(data))

                    async def topic_peers() -> int:
                        return int((await child.call(op="status"))["topic_peers"])

                    return Node(
                        ID.from_base58(ready["peer_id"]),
                        [Multiaddr(a) for a in ready["addrs"]],
                        publish,
                        topic_peers,
                    )

                nodes.append(make())

            async def connect(i: int, j: int) -> None:
                await children[i].call(
                    op="connect", peer_id=nodes[j].peer_id.to_base58(), addrs=[str(a) for a in nodes[j].addrs]
                )

            async def mesh_ready() -> bool:
                return all([(await c.call(op="status"))["mesh"] >= 4 for c in children])

            async def received() -> int:
                return sum([(await c.call(op="status"))["received"] for c in children])

            async def collect() -> None:
                for c, node in zip(children, nodes, strict=True):
                    node.receipts = [(int(i), float(lat)) for i, lat in await c.call(op="receipts")]

            async def gc_reset() -> None:
                for c in children:
                    await c.call(op="gc", reset=True)

            async def gc_report() -> dict[str, Any]:
                """GC collections in the ten nodes during the measurement: count, summed and max pause."""
                stats = [await c.call(op="gc") for c in children]
                return {
                    "gc_count": [int(sum(s["count"][g] for s in stats)) for g in range(3)],
                    "gc_total_ms": [round(sum(s["total_ms"][g] for s in stats), 2) for g in range(3)],
                    "gc_max_ms": [max(s["max_ms"][g] for s in stats) for g in range(3)],
                    "task_steps_per_msg": sum(s["task_steps"] for s in stats) / MESSAGES,
                    "io_waits_per_msg": sum(s["io_waits"] for s in stats) / MESSAGES,
                }

            yield Mesh(
                nodes,
                connect,
                settle=0.5,
                mesh_ready=mesh_ready,
                received=received,
                collect=collect,
                pids=[c.proc.pid for c in children],
                start=gc_reset,
                report=gc_report,
            )
        finally:
            for c in children:
                with contextlib.suppress(Exception):
                    assert c.proc.stdin is not None
                    await c.proc.stdin.aclose()
            with trio.move_on_after(5):
                for c in children:
                    await c.proc.wait()
            for c in children:
                if c.proc.returncode is None:
                    c.proc.kill()


# ------------------------------------------------------------------ stock py-libp2p


def tuned_stock_gossipsub() -> GossipSub:
    return GossipSub(
        protocols=[GOSSIPSUB_V12, GOSSIPSUB_V11, GOSSIPSUB_V10],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        max_messages_per_topic_per_second=1e6,
        eclipse_protection_enabled=False,
    )


@asynccontextmanager
async def stock_mesh(n: int, tuned: bool) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes: list[Node] = []
        hosts = []
        for _ in range(n):
            h = new_noise_only_host()
            await stack.enter_async_context(h.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            router = tuned_stock_gossipsub() if tuned else new_stock_gossipsub()
            pubsub = Pubsub(h, router)
            await stack.enter_async_context(background_trio_service(pubsub))
            await stack.enter_async_context(background_trio_service(router))
            await pubsub.wait_until_ready()
            sub = await pubsub.subscribe(TOPIC)

            def make(pubsub: Pubsub = pubsub, h: Any = h) -> Node:
                async def publish(data: bytes) -> None:
                    await pubsub.publish(TOPIC, data)

                async def topic_peers() -> int:
                    return len(pubsub.peer_topics.get(TOPIC, ()))

                return Node(h.get_id(), list(h.get_addrs()), publish, topic_peers)

            node = make()

            async def drain(sub: Any = sub, node: Node = node) -> None:
                while True:
                    msg = await sub.get()
                    node.record(msg.data, time.monotonic())

            nursery.start_soon(drain)
            nodes.append(node)
            hosts.append(h)

        async def connect(i: int, j: int) -> None:
            await hosts[i].connect(PeerInfo(nodes[j].peer_id, nodes[j].addrs))

        yield Mesh(nodes, connect, settle=2.5)


# ------------------------------------------------------------------ go


@asynccontextmanager
async def go_mesh(n: int, tools: InteropTools) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(start_go_peer(tools)) for _ in range(n)]
        nursery = await stack.enter_async_context(trio.open_nursery())
        stack.callback(nursery.cancel_scope.cancel)
        nodes: list[Node] = []
        for go in peers:

            def make(go: Any = go) -> Node:
                async def publish(data: bytes) -> None:
                    await go.pubsub_publish(TOPIC, data)

                async def topic_peers() -> int:
                    return len(await go.pubsub_list_peers(TOPIC))

                return Node(go.peer_id, list(go.addrs), publish, topic_peers)

            node = make()
            sub = await stack.enter_async_context(go.subscribe(TOPIC))

            async def drain(sub: Any = sub, node: Node = node) -> None:
                async for msg in sub:
                    if msg.from_peer != node.peer_id:  # p2pd also delivers its own publishes
                        node.record(msg.data, msg.received_at)

            nursery.start_soon(drain)
            nodes.append(node)

        async def connect(i: int, j: int) -> None:
            await peers[i].connect(nodes[j].peer_id, nodes[j].addrs)

        yield Mesh(nodes, connect, settle=GO_MESH_SETTLE + 1.0, pids=[go.process.popen.pid for go in peers])


# ------------------------------------------------------------------ measurement


async def run_mesh(mesh: Mesh, pace: float) -> dict[str, Any]:
    n = len(mesh.nodes)
    for i in range(n):
        for k in range(1, CHORDS + 1):
            await mesh.connect(i, (i + k) % n)
    deadline = time.monotonic() + MESH_WAIT
    while time.monotonic() < deadline:
        counts = [await node.topic_peers() for node in mesh.nodes]
        if min(counts) >= 3 and (mesh.mesh_ready is None or await mesh.mesh_ready()):
            break
        await trio.sleep(0.1)
    await trio.sleep(mesh.settle)
    for node in mesh.nodes:
        node.receipts.clear()

    async def received() -> int:
        if mesh.received is not None:
            return await mesh.received()
        return sum(len(nd.receipts) for nd in mesh.nodes)

    pad = b"\x00" * max(0, SIZE - HEADER.size)
    if mesh.start is not None:
        await mesh.start()
    cpu0 = cpu_seconds(mesh.pids)
    t0 = time.monotonic()
    for i in range(MESSAGES):
        data = HEADER.pack(i, time.monotonic_ns()) + pad
        await mesh.nodes[i % n].publish(data)
        if pace:
            await trio.sleep(pace)
        else:
            await trio.lowlevel.checkpoint()
    expected = MESSAGES * (n - 1)
    end = time.monotonic() + DELIVERY_WAIT
    while time.monotonic() < end and await received() < expected:
        await trio.sleep(0.02)
    last = time.monotonic()
    cpu = cpu_seconds(mesh.pids) - cpu0
    if mesh.collect is not None:
        await mesh.collect()
    extra = await mesh.report() if mesh.report is not None else {}
    lat = sorted(latency for nd in mesh.nodes for _, latency in nd.receipts)
    unique = sum(len({i for i, _ in nd.receipts}) for nd in mesh.nodes)
    span = last - t0  # polled every 20 ms, so it over-states the span by up to 20 ms
    return {
        "delivered": unique,
        "expected": expected,
        "duplicates": sum(len(nd.receipts) for nd in mesh.nodes) - unique,
        "msgs_per_s": MESSAGES / span if unique == expected else float("nan"),
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "mean_ms": 1e3 * statistics.fmean(lat) if lat else float("nan"),
        "cpu_ms_per_msg": 1e3 * cpu / MESSAGES,
        **extra,
    }


@asynccontextmanager
async def open_mesh(kind: str, tools: InteropTools | None) -> AsyncIterator[Mesh]:
    if kind == "ours":
        async with ours_mesh(NODES) as m:
            yield m
    elif kind == "ours-procs":
        async with ours_proc_mesh(NODES) as m:
            yield m
    elif kind == "stock-default":
        async with stock_mesh(NODES, tuned=False) as m:
            yield m
    elif kind == "stock-tuned":
        async with stock_mesh(NODES, tuned=True) as m:
            yield m
    elif kind == "go":
        assert tools is not None
        async with go_mesh(NODES, tools) as m:
            yield m
    else:
        raise SystemExit(f"unknown implementation {kind!r}")


def _span(values: list[float]) -> str:
    """``min-max`` of the finite values (``nan`` when there are none)."""
    finite = [v for v in values if v == v]
    return f"{min(finite):.3g}-{max(finite):.3g}" if finite else "nan"


def _leaves(exc: BaseException) -> str:
    """The innermost exceptions of a (nested) exception group, for a one-line report."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_leaves(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _median(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


async def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    tools = ensure_tools() if "go" in IMPLS else None
    modes = [("paced", PACE_MS / 1e3), ("burst", 0.0)]
    # results[(kind, mode)][r] is round r's result; every round builds fresh meshes and
    # alternates the order of the implementations, so slow drifts in machine load hit
    # each implementation alike instead of whichever happened to run last.
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failures: dict[tuple[str, str], int] = {}  # attempts that failed before measuring, retried
    for rnd in range(ROUNDS):
        order = IMPLS if rnd % 2 == 0 else IMPLS[::-1]
        for mode, pace in modes:
            for kind in order:
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        with trio.fail_after(MESH_WAIT + DELIVERY_WAIT + 120):
                            async with open_mesh(kind, tools) as mesh:
                                r = await run_mesh(mesh, pace)
                                results.setdefault((kind, mode), []).append(r)
                                print(f"# round {rnd} {kind} {mode}: {r}", file=sys.stderr)
                    except (
                        BaseExceptionGroup
                    ) as exc:  # py-libp2p hosts and p2pd sometimes fail while shutting down
                        done = len(results.get((kind, mode), ())) > rnd
                        what = "teardown error ignored" if done else f"attempt {attempt} failed"
                        print(f"# round {rnd} {kind} {mode}: {what}: {_leaves(exc)}", file=sys.stderr)
                        if not done:
                            failures[(kind, mode)] = failures.get((kind, mode), 0) + 1
                            if attempt == ATTEMPTS:
                                raise
                            continue
                    break
    rows = []
    for kind in IMPLS:
        for mode, _ in modes:
            rs = results[(kind, mode)]
            go = results.get(("go", mode))
            p99 = [r["p99_ms"] for r in rs]
            ratios = (
                [
                    r["p99_ms"] / g["p99_ms"] if g["p99_ms"] == g["p99_ms"] and g["p99_ms"] else float("nan")
                    for r, g in zip(rs, go, strict=True)
                ]
                if go
                else [float("nan")]
            )
            delivered = sum(r["delivered"] for r in rs)
            expected = sum(r["expected"] for r in rs)
            rows.append(
                [
                    kind,
                    mode if mode == "burst" else f"paced {PACE_MS:g} ms",
                    f"{delivered}/{expected} ({100 * delivered / expected:.1f}%)",
                    sum(r["duplicates"] for r in rs),
                    _median([r["msgs_per_s"] for r in rs]),
                    _median([r["p50_ms"] for r in rs]),
                    _median(p99),
                    _span(p99),
                    _median(ratios),
                    _span(ratios),
                    _median([r["cpu_ms_per_msg"] for r in rs]),
                    failures.get((kind, mode), 0),
                ]
            )
    print(
        f"Machine: {machine()}; loopback TCP, Noise, yamux. {NODES} nodes, ring + {CHORDS} chords "
        f"(degree {2 * CHORDS}), {MESSAGES} messages of {SIZE} bytes published round-robin; "
        f"{ROUNDS} rounds of fresh meshes (implementation order alternating), medians over rounds; "
        f"delivered and duplicates summed over rounds.\n"
    )
    print(
        table(
            [
                "implementation",
                "publishing",
                "delivered",
                "duplicates",
                "messages/s",
                "p50 latency ms",
                "p99 latency ms (median)",
                "p99 min-max",
                "p99 / go p99 (median)",
                "ratio min-max (per round)",
                "CPU ms per message",
                "failed attempts (rebuilt)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    trio.run(main)
