"""QUIC as py-libp2p 0.8.1 ships it, next to TCP, on loopback, in one run.

    scripts/bench/run quic          (env MM_BENCH_ROUNDS=10, MM_BENCH_MIB=1)

Rows: stock py-libp2p /quic-v1 (`new_host(enable_quic=True)`), stock py-libp2p TCP
(Noise + yamux via `new_host`), and meshmerge's host (TCP, Noise, yamux, our swarm).
Measured (medians): a fresh dial (connect, then disconnect between rounds); a 100-byte
echo on a new stream over an open connection; an echo of MM_BENCH_MIB MiB (written
and read back on one stream). The figures inform whether /quic-v1 is worth offering
(README "QUIC"); the correctness shortfall is in tests/daemon/test_quic_probe.py.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import multiaddr
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import machine, table  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

from meshmerge.daemon.host import HostConfig, running_host  # noqa: E402
from meshmerge.daemon.identity import Identity  # noqa: E402

ROUNDS = int(os.environ.get("MM_BENCH_ROUNDS", "10"))
MIB = int(os.environ.get("MM_BENCH_MIB", "1"))
ECHO = TProtocol("/meshmerge/bench/echo/1")


async def _echo(stream: Any) -> None:
    try:
        while data := await stream.read(65536):
            await stream.write(data)
    except Exception:
        pass
    finally:
        await stream.close()


@asynccontextmanager
async def stock(listen: str) -> AsyncIterator[Any]:
    addrs = [multiaddr.Multiaddr(listen)]
    host = new_host(key_pair=create_new_key_pair(), listen_addrs=addrs, enable_quic="quic" in listen)
    async with host.run(addrs):
        yield host


@asynccontextmanager
async def ours(_listen: str) -> AsyncIterator[Any]:
    async with running_host(HostConfig(listen_addrs=("/ip4/127.0.0.1/tcp/0",)), Identity.generate()) as h:
        yield h


async def roundtrip(a: Any, b: Any, payload: bytes) -> float:
    t0 = time.perf_counter()
    s = await a.new_stream(b.get_id(), [ECHO])
    got = 0
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for i in range(0, len(payload), 65536):
                await s.write(payload[i : i + 65536])

        nursery.start_soon(send)
        while got < len(payload):
            chunk = await s.read(65536)
            if not chunk:
                raise RuntimeError(f"stream ended after {got} of {len(payload)} bytes")
            got += len(chunk)
    await s.close()
    return time.perf_counter() - t0


async def measure(make: Callable[[str], Any], listen: str) -> dict[str, float]:
    dials: list[float] = []
    small: list[float] = []
    big: list[float] = []
    async with make(listen) as a, make(listen) as b:
        b.set_stream_handler(ECHO, _echo)
        peer = info_from_p2p_addr(b.get_addrs()[0])
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            with trio.fail_after(30):
                await a.connect(peer)
            dials.append(time.perf_counter() - t0)
            await a.disconnect(b.get_id())
            await trio.sleep(0.05)
        with trio.fail_after(30):
            await a.connect(peer)
        for _ in range(ROUNDS):
            with trio.fail_after(30):
                small.append(await roundtrip(a, b, b"x" * 100))
        for _ in range(3):
            with trio.fail_after(120):
                big.append(await roundtrip(a, b, os.urandom(MIB << 20)))
    return {
        "dial": statistics.median(dials) * 1000,
        "small": statistics.median(small) * 1000,
        "big": statistics.median(big),
    }


async def main() -> None:
    rows = [
        ("stock py-libp2p 0.8.1, /quic-v1", stock, "/ip4/127.0.0.1/udp/0/quic-v1"),
        ("stock py-libp2p 0.8.1, TCP + Noise + yamux", stock, "/ip4/127.0.0.1/tcp/0"),
        ("meshmerge host, TCP + Noise + yamux", ours, ""),
    ]
    results = {}
    for name, make, listen in rows:
        results[name] = await measure(make, listen)
    base = results[rows[0][0]]
    out = []
    for name, _, _ in rows:
        r = results[name]
        out.append(
            [
                name,
                r["dial"],
                r["small"],
                r["big"],
                MIB / r["big"],
                base["big"] / r["big"],
            ]
        )
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f}; {ROUNDS} rounds, {MIB} MiB echo.\n")
    print(
        table(
            [
                "transport",
                "dial ms",
                "100 B echo ms",
                f"{MIB} MiB echo s",
                "MiB/s each way",
                "QUIC time ÷ this time",
            ],
            out,
        )
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main)
