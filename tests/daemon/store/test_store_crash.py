"""kill -9 at random moments loses nothing that was acknowledged.

A child process (crash_child.py) works on a real store with fsync on and
prints an ACK line after each call returns. The parent SIGKILLs it at a
random moment, reopens the store and checks every ACKed sequence number,
operation and blob is there, and that no seq was ever handed out twice.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from meshmerge.crdt import verify_tensors
from meshmerge.daemon.store import Store
from tests.crdt.factories import schema, signer

ROOT = Path(__file__).resolve().parents[3]
SID = schema().id


def run_and_kill(data_dir: Path, seed: int, delay: float, mode: str = "ops") -> list[str]:
    """Start the child, SIGKILL it `delay` seconds after READY; return its complete lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.daemon.store.crash_child", str(data_dir), str(seed), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if raw.endswith(b"\n"):  # a line cut by the kill was never fully acknowledged
                lines.append(raw.decode().strip())
                if lines[-1] == "READY":
                    ready.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        if not ready.wait(60):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"child never became ready: {err.decode()[-2000:]}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        t.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    if proc.stderr is not None:
        proc.stderr.close()
    return lines


def check(data_dir: Path, acked: dict[str, list[str]], mode: str = "ops") -> None:
    me = signer(0).peer_id
    with Store.open(data_dir) as store:
        state = store.load_state(SID)
        counters = store.counters
        assert counters.corrupt_regions == 0 and counters.undecodable_records == 0
        assert counters.replay_rejected == 0
        assert not state.orset.is_convicted(me), "the node reused a seq: it convicted itself"
        for cid in acked["OP"]:
            assert bytes.fromhex(cid) in state.orset.adds
        removed_targets = {r.target for r in state.orset.removals.values()}
        for cid in acked["REM"]:
            assert bytes.fromhex(cid) in removed_targets
        for cid in acked["BLOB"]:
            if mode == "gc" and bytes.fromhex(cid) in removed_targets:
                continue  # a removal may be durable before its REM line: no longer live, collectable
            raw = bytes.fromhex(cid)
            tensors = store.get_tensors(raw)
            assert tensors is not None, cid
            verify_tensors(state.header(raw), tensors)
        seqs = [int(s) for s in acked["SEQ"]]
        assert len(seqs) == len(set(seqs)), "a sequence number was handed out twice"
        if seqs:
            assert store.next_seq(SID, me) > max(seqs)
        assert list((data_dir / "blobs" / ".tmp").iterdir()) == []
        if mode == "gc":
            check_collection(data_dir, store, set(state.live_ids()))


def check_collection(data_dir: Path, store: Store, live: set[bytes]) -> None:
    """After a crash, a collection (as the daemon runs on start) leaves exactly the live blobs."""
    blobs = data_dir / "blobs"
    on_disk = {p: p.stat().st_size for p in blobs.glob("[0-9a-f][0-9a-f]/*.safetensors")}
    assert store.blob_usage().bytes == sum(on_disk.values())  # recounted on open, whatever the crash hit
    store.collect_garbage()
    left = {bytes.fromhex(p.name.removesuffix(".safetensors")) for p in blobs.glob("[0-9a-f][0-9a-f]/*")}
    assert left <= live, "a dead contribution's blob survived a collection"
    assert all(bytes.fromhex(p.name.removesuffix(".part")) in live for p in (blobs / ".partial").iterdir())
    assert store.blob_usage().bytes == sum(p.stat().st_size for p in blobs.glob("[0-9a-f][0-9a-f]/*"))


def kill_repeatedly(data_dir: Path, kills: int, mode: str, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    acked: dict[str, list[str]] = {"SEQ": [], "OP": [], "REM": [], "BLOB": [], "SNAP": [], "GC": []}
    for k in range(kills):
        lines = run_and_kill(data_dir, seed + k, rng.uniform(0.0, 0.35), mode)
        for line in lines:
            kind, _, value = line.partition(" ")
            if kind in acked:
                acked[kind].append(value)
        check(data_dir, acked, mode)
    return acked


@pytest.mark.parametrize("mode", ["ops", "snapshots"])
def test_kill_minus_9_loses_nothing_acknowledged(tmp_path: Path, mode: str) -> None:
    kills = 12
    acked = kill_repeatedly(tmp_path, kills, mode, seed=20261123)
    # the kills must have landed on real work, snapshots included
    assert len(acked["OP"]) >= kills and acked["SNAP"], {k: len(v) for k, v in acked.items()}


def test_kill_minus_9_during_blob_collection_loses_no_live_blob(tmp_path: Path) -> None:
    kills = 12
    acked = kill_repeatedly(tmp_path, kills, "gc", seed=1123)
    assert len(acked["OP"]) >= kills and len(acked["GC"]) >= kills and acked["REM"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ops", "snapshots", "gc"])
def test_kill_minus_9_many_times(tmp_path: Path, mode: str) -> None:
    acked = kill_repeatedly(tmp_path, 60, mode, seed=7)
    assert len(acked["OP"]) >= 60 and acked["SNAP"]
