"""Store throughput and recovery, against plain files and SQLite measured in the same run.

- append: one single-contribution delta per call (a 16-tensor manifest, ~1.3 KB
  record), fsync on and off. Peers: the same bytes appended to a plain file
  with write + fdatasync (the floor any durable log pays), and SQLite (stdlib
  sqlite3, WAL, synchronous=FULL resp. OFF, one INSERT + COMMIT per record).
- snapshot and recovery at N contributions: write the snapshot, then reopen
  the store and rebuild the MergeState (decode + Ed25519 verify + OR-Set), and
  the same rebuild from an op log of N single-op records.
- blob put: verify a safetensors blob against its manifest (sha-256 of every
  tensor) and publish it (tmp, fsync, rename, fsync dir), via put_blob and via
  the chunked writer, against a plain tmp + write + fsync + rename of the same
  bytes; and reading it back (mmap views vs. reading the file into memory).

Run: scripts/bench/run store
     (or .venv/bin/python scripts/bench/store.py --contributions 10000 --blob-mb 256)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures
from _table import machine, table

from meshmerge.crdt import MergeState, Signer
from meshmerge.crdt.tensorfile import dumps as st_dumps
from meshmerge.daemon.store import Store
from meshmerge.daemon.store.blobs import verify
from meshmerge.proto.messages import (
    ContributionHeader,
    SetSchema,
    SignedHeader,
    StateMessage,
    TensorEntry,
    dumps,
)

TENSORS = 16


def make_schema() -> SetSchema:
    return _fixtures.make_schema("bench/store", TENSORS)


def make_headers(schema: SetSchema, n: int, authors: int = 50) -> list[SignedHeader]:
    return _fixtures.make_headers(schema, n, authors, key_prefix=b"bench-store")


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1e6


def bench_appends(
    base: Path, schema: SetSchema, headers: list[SignedHeader], fsync: bool
) -> list[list[object]]:
    """The three sinks take turns op by op, so disk noise from other jobs hits them alike."""
    msgs = [StateMessage(schema.id, adds=(h,)) for h in headers]
    payloads = [dumps(m) for m in msgs]
    store = Store.open(base / f"store-{fsync}", fsync=fsync)
    store.add_set(schema)
    fd = os.open(base / f"plain-{fsync}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    db = sqlite3.connect(base / f"sqlite-{fsync}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
    db.execute("CREATE TABLE ops (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")

    def ours(i: int) -> None:
        store.append(schema.id, msgs[i])

    def plain(i: int) -> None:
        os.write(fd, len(payloads[i]).to_bytes(4, "little") + payloads[i])
        if fsync:
            os.fdatasync(fd)

    def lite(i: int) -> None:
        db.execute("BEGIN")
        db.execute("INSERT INTO ops (body) VALUES (?)", (payloads[i],))
        db.execute("COMMIT")

    sinks = {"meshmerge store": ours, "plain file write": plain, "sqlite3 WAL": lite}
    lat: dict[str, list[float]] = {k: [] for k in sinks}
    names = list(sinks)
    for i in range(len(msgs)):
        for name in names[i % 3 :] + names[: i % 3]:
            t0 = time.perf_counter()
            sinks[name](i)
            lat[name].append(time.perf_counter() - t0)
    store.close()
    os.close(fd)
    db.close()
    label = "on" if fsync else "off"
    rate = {k: len(v) / sum(v) for k, v in lat.items()}
    return [
        [
            f"append, fsync {label}",
            k,
            round(rate[k]),
            statistics.median(v) * 1e6,
            pct(v, 0.99),
            rate["meshmerge store"] / rate[k],
        ]
        for k, v in lat.items()
    ]


def bench_recovery(base: Path, schema: SetSchema, headers: list[SignedHeader]) -> list[list[object]]:
    n = len(headers)
    live = MergeState(schema)
    live.apply(StateMessage(schema.id, adds=tuple(headers)))
    rows: list[list[object]] = []
    d = base / "recovery"
    with Store.open(d) as store:
        store.add_set(schema)
        t0 = time.perf_counter()
        store.snapshot(schema.id, live)
        rows.append([f"snapshot write ({n} contributions)", time.perf_counter() - t0])
    size = sum(p.stat().st_size for p in (d / "sets").rglob("snapshot-*"))
    t0 = time.perf_counter()
    with Store.open(d) as store:
        state = store.load_state(schema.id)
    rows.append([f"reopen + rebuild from snapshot ({size / 1e6:.1f} MB)", time.perf_counter() - t0])
    assert state.root() == live.root()
    # the same state from an op log of n single-op records
    d2 = base / "replay"
    with Store.open(d2, fsync=False) as store:
        store.add_set(schema)
        for h in headers:
            store.append(schema.id, StateMessage(schema.id, adds=(h,)))
        log_size = store.oplog_bytes(schema.id)
    t0 = time.perf_counter()
    with Store.open(d2) as store:
        opened = time.perf_counter()
        state = store.load_state(schema.id)
    end = time.perf_counter()
    assert state.root() == live.root()
    rows.append([f"reopen: scan + verify MACs of a {log_size / 1e6:.1f} MB op log", opened - t0])
    rows.append([f"rebuild from {n} op-log records", end - opened])
    # how much of a rebuild is the CRDT itself: apply the same messages with no store
    msgs = [StateMessage(schema.id, adds=(h,)) for h in headers]
    scratch = MergeState(schema)
    t0 = time.perf_counter()
    for m in msgs:
        scratch.apply(m)
    rows.append([f"(reference) MergeState.apply of the {n} messages, no I/O", time.perf_counter() - t0])
    return rows


def bench_blobs(base: Path, mb: int, fsync: bool, reps: int = 3) -> list[list[object]]:
    """Best of `reps`; the three writers take turns going first, and the page cache is
    flushed (sync) before each timed write so no writer pays for another's dirty pages.
    With fsync off every writer skips its fsyncs: that isolates the CPU cost of the store
    (verification, copies) from the shared disk's very noisy write speed."""
    per = mb * 1024 * 1024 // 4 // 4
    rng = np.random.default_rng(1)
    tensors = {f"w{i}": rng.standard_normal(per, dtype=np.float32) for i in range(4)}
    schema = SetSchema("bench/blob", "weights", tuple(TensorEntry(k, "F32", (per,)) for k in sorted(tensors)))
    scratch = MergeState(schema)
    signer = Signer(hashlib.sha256(b"bench-blob").digest())
    data = st_dumps(tensors, dict.fromkeys(tensors, "F32"))
    gb = len(data) / 1e9
    times: dict[str, float] = {}
    seq = 0

    def timed(name: str, fn: Callable[[], object]) -> None:
        os.sync()
        t0 = time.perf_counter()
        fn()
        times[name] = min(times.get(name, float("inf")), time.perf_counter() - t0)

    for rep in range(reps):
        d = base / f"blobs-{rep}"
        with Store.open(d, fsync=fsync) as store:
            h_put = scratch.contribute(signer, tensors, seq=seq).header
            h_writer = scratch.contribute(signer, tensors, seq=seq + 1).header
            seq += 2

            def put(h: ContributionHeader = h_put, s: Store = store) -> None:
                s.put_blob(h, data)

            def chunked(h: ContributionHeader = h_writer, s: Store = store) -> None:
                with s.blob_writer(h) as w:
                    view = memoryview(data)
                    for off in range(0, len(data), 1 << 20):
                        w.write(off, view[off : off + (1 << 20)])
                    w.finish()

            def plain(d: Path = d) -> None:
                tmp = d / ".plain.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                view = memoryview(data)
                for off in range(0, len(data), 1 << 30):
                    os.write(fd, view[off : off + (1 << 30)])
                if fsync:
                    os.fsync(fd)
                os.close(fd)
                os.replace(tmp, d / "plain.safetensors")

            writers = [("put", put), ("writer", chunked), ("plain", plain)]
            for name, fn in writers[rep % 3 :] + writers[: rep % 3]:
                timed(name, fn)
            timed("verify", lambda h=h_put: verify(h, data))

            def get(h: ContributionHeader = h_put, s: Store = store) -> None:
                got = s.get_tensors(h.id)
                assert got is not None
                sum(float(a.sum()) for a in got.values())

            def read(d: Path = d) -> None:
                raw = (d / "plain.safetensors").read_bytes()
                head = 8 + int.from_bytes(raw[:8], "little")
                sum(float(np.frombuffer(raw, np.float32, per, head + 4 * per * i).sum()) for i in range(4))

            timed("get", get)
            timed("read", read)
        shutil.rmtree(d)
    mb_ = len(data) / 1e6
    sync = "fsync" if fsync else "no fsync"
    rows: list[list[object]] = [
        [
            f"put_blob: tmp + (verify ∥ {sync}) + rename, {mb_:.0f} MB",
            gb / times["put"],
            times["plain"] / times["put"],
        ],
        [
            f"blob_writer: 1 MiB chunks + finish, {sync}",
            gb / times["writer"],
            times["plain"] / times["writer"],
        ],
        [f"plain tmp + write + {sync} + rename (no verification)", gb / times["plain"], 1.0],
    ]
    if not fsync:
        return rows
    return [
        *rows,
        [
            "(part of put) verify only: parse + sha-256 of every tensor",
            gb / times["verify"],
            times["plain"] / times["verify"],
        ],
        ["get_tensors (mmap views) + sum of every tensor", gb / times["get"], times["read"] / times["get"]],
        ["plain read_bytes + frombuffer + sum of every tensor", gb / times["read"], 1.0],
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--contributions", type=int, default=10_000)
    parser.add_argument("--blob-mb", type=int, default=128)
    args = parser.parse_args()
    schema = make_schema()
    n = max(args.appends, args.contributions)
    print(f"signing {n} {TENSORS}-tensor headers…", file=sys.stderr)
    headers = make_headers(schema, n)
    base = Path(tempfile.mkdtemp(prefix="mm-bench-store-", dir=os.environ.get("MM_BENCH_DIR")))
    try:
        print(f"# store ({machine()}, data in {base})\n")
        rows = bench_appends(base, schema, headers[: args.appends], True)
        rows += bench_appends(base, schema, headers[: args.appends], False)
        print(f"## append ({args.appends} single-contribution deltas)\n")
        print(
            table(["case", "implementation", "ops/s", "median µs", "p99 µs", "meshmerge ops/s ÷ this"], rows)
        )
        print(f"\n## snapshot and recovery ({args.contributions} contributions)\n")
        print(table(["step", "seconds"], bench_recovery(base, schema, headers[: args.contributions])))
        print(f"\n## blobs ({args.blob_mb} MiB, best of 3, page cache synced before each write)\n")
        blob_rows = bench_blobs(base, args.blob_mb, True) + bench_blobs(base, args.blob_mb, False)
        print(table(["operation", "GB/s", "plain time ÷ this time"], blob_rows))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
