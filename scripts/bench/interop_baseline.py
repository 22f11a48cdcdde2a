"""Interop baseline on loopback: go-libp2p, js-libp2p and stock py-libp2p, in one run.

What is measured, per ordered pair (dialer -> listener), each pair on fresh peers:
- dial: time to a usable connection from one dialer to DIALS fresh listeners
  (fresh because js redials a peer that hung up, so redialing one listener
  measures nothing); first dial and median of the later ones (warm dialer).
  go: CONNECT over the control socket; js: node.dial inside node; py: host.connect.
- ping: median RTT of 20 pings from the dialer. go and py reuse one ping
  stream; js opens one stream per ping (its ping service has no reuse).
- gossip (rows per direction, on the connections go->go, go->js, py->go,
  py->js): 100 messages on a fresh topic after both sides see each other's
  subscription plus a 1.5 s settle (one heartbeat for go and js), published
  back to back ("burst": shows queueing in the receiver) and one every 10 ms
  ("paced": per-message latency); delivered count within 10 s, p50/p99
  latency from the publish call to receipt (timed in node for js, where the
  driver reads it for go and py; all CLOCK_MONOTONIC).

Stock py-libp2p is `new_host` with Noise only and its GossipSub with only the
required degree arguments, so it shows py-libp2p's defaults.

Run: scripts/bench/run interop_baseline   (sizes: INTEROP_BENCH_DIALS, _PINGS, _MESSAGES)
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import machine, table

from meshmerge.testing.interop import wait_until
from meshmerge.testing.interop.anypeer import AnyPeer, Kind, start_peer
from meshmerge.testing.interop.common import PubsubMessage
from meshmerge.testing.interop.tools import ensure_tools

DIALS = int(os.environ.get("INTEROP_BENCH_DIALS", "5"))
PINGS = int(os.environ.get("INTEROP_BENCH_PINGS", "20"))
MESSAGES = int(os.environ.get("INTEROP_BENCH_MESSAGES", "100"))
SETTLE = 1.5
DELIVERY_WAIT = 10.0
TOPIC = "meshmerge-interop-bench"


@asynccontextmanager
async def subscription(peer: AnyPeer, topic: str) -> AsyncIterator[Callable[[], Awaitable[PubsubMessage]]]:
    async with peer.subscription(topic) as receive:
        yield receive


def ms(seconds: float) -> float:
    return seconds * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_ping(dialer: AnyPeer, listener: AnyPeer) -> float:
    await wait_until(lambda: listener.connected_to(dialer), timeout=10, what="listener sees the connection")
    await trio.sleep(0.3)  # let identify finish before pinging
    return ms(statistics.median(await dialer.ping(listener, PINGS)))


async def measure_gossip(sender: AnyPeer, receiver: AnyPeer, gap: float) -> dict[str, float]:
    """Publish MESSAGES from sender, `gap` seconds apart (0: back to back), on a fresh topic."""
    topic = f"{TOPIC}-{sender.kind}-{receiver.kind}-{gap}"
    async with subscription(receiver, topic) as receive, subscription(sender, topic):
        await wait_until(
            lambda: sender.sees_subscriber(receiver, topic), timeout=15, what="sender sees subscriber"
        )
        await wait_until(
            lambda: receiver.sees_subscriber(sender, topic), timeout=15, what="receiver sees sender"
        )
        await trio.sleep(SETTLE)
        sent_at: dict[bytes, float] = {}
        latencies: list[float] = []

        async def collect() -> None:
            while len(latencies) < MESSAGES:
                msg = await receive()
                if msg.data in sent_at and msg.from_peer == sender.peer_id:
                    latencies.append(msg.received_at - sent_at.pop(msg.data))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            for i in range(MESSAGES):
                payload = b"bench %s->%s %05d" % (sender.kind.encode(), receiver.kind.encode(), i)
                sent_at[payload] = time.monotonic()
                await sender.publish(topic, payload)
                if gap:
                    await trio.sleep(gap)
            with trio.move_on_after(DELIVERY_WAIT):
                while len(latencies) < MESSAGES:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    return {
        "delivered": len(latencies),
        "p50": ms(pct(latencies, 0.5)) if latencies else float("nan"),
        "p99": ms(pct(latencies, 0.99)) if latencies else float("nan"),
    }


PAIRS: list[tuple[Kind, Kind]] = [
    ("go", "go"),
    ("go", "js"),
    ("js", "go"),
    ("py", "go"),
    ("go", "py"),
    ("py", "js"),
    ("js", "py"),
]
GOSSIP_PAIRS = {("go", "go"), ("go", "js"), ("py", "go"), ("py", "js")}  # gossip both ways on these
GAPS = {"burst": 0.0, "paced 10 ms": 0.01}


async def main() -> None:
    tools = ensure_tools()
    dial_rows: list[list[object]] = []
    gossip_rows: list[list[object]] = []
    for a_kind, b_kind in PAIRS:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(start_peer(a_kind, tools))
            dials = []
            for i in range(DIALS):
                listener_stack = AsyncExitStack()
                b = await listener_stack.enter_async_context(start_peer(b_kind, tools))
                with trio.fail_after(30):
                    dials.append(ms(await a.dial(b)))
                if i < DIALS - 1:
                    await listener_stack.aclose()
            stack.push_async_exit(listener_stack)
            with trio.fail_after(60):
                ping = await measure_ping(a, b)
            later = statistics.median(dials[1:]) if len(dials) > 1 else float("nan")
            dial_rows.append([f"{a_kind} -> {b_kind}", dials[0], later, ping])
            shown = [round(d, 1) for d in dials]
            print(f"# {a_kind} -> {b_kind}: dials {shown} ms, ping {ping:.2f} ms", file=sys.stderr)
            if (a_kind, b_kind) in GOSSIP_PAIRS:
                directions = ((a, b),) if a_kind == b_kind else ((a, b), (b, a))
                for (sender, receiver), (mode, gap) in itertools.product(directions, GAPS.items()):
                    with trio.fail_after(120):
                        g = await measure_gossip(sender, receiver, gap)
                    gossip_rows.append(
                        [
                            f"{sender.kind} -> {receiver.kind}",
                            mode,
                            f"{g['delivered']}/{MESSAGES}",
                            g["p50"],
                            g["p99"],
                        ]
                    )
                    print(f"# gossip {sender.kind} -> {receiver.kind} {mode}: {g}", file=sys.stderr)

    print(
        f"## interop baseline\n\nMachine: {machine()}; loopback TCP, Noise, yamux. "
        f"{DIALS} dials, {PINGS} pings, {MESSAGES} gossip messages per direction.\n"
    )
    print(
        table(
            ["dialer -> listener", "first dial ms", "median later dial ms", "median ping RTT ms"], dial_rows
        )
    )
    print()
    headers = ["gossip sender -> receiver", "publishing", "delivered", "p50 latency ms", "p99 latency ms"]
    print(table(headers, gossip_rows))
    go_go = next(r for r in dial_rows if r[0] == "go -> go")
    py_rows = [r for r in dial_rows if str(r[0]).startswith("py ->")]
    ratios = ", ".join(f"{r[0]}: {_ratio(r[2], go_go[2])}" for r in py_rows)
    print(f"\nLater-dial time of stock py-libp2p relative to go -> go in this run: {ratios}.")


def _ratio(a: object, b: object) -> str:
    return f"{float(str(a)) / float(str(b)):.1f}x"


if __name__ == "__main__":
    trio.run(main)
