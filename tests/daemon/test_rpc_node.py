"""The daemon's local side end to end: a real daemon task, a real Unix socket, the real client."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from meshmerge.client import Client, RpcError
from meshmerge.crdt import tensorfile
from meshmerge.daemon.config import Config, StoreSection, dev_config
from meshmerge.daemon.main import run

SHAPES = {"a": (8, 4), "b": (16,)}
SPEC = {n: ("F32", s) for n, s in SHAPES.items()}


def model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return tensorfile.dumps(
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()},
        dict.fromkeys(SHAPES, "F32"),
    )


def with_daemon(
    tmp_path: Path, body: Callable[[Path], Any], config: Config | None = None, **store: Any
) -> Any:
    """Run a daemon (no network) in trio and `body(socket_path)` in a worker thread."""
    config = config or dev_config(tmp_path)
    if store:
        config = config.with_overrides(store=StoreSection(**store))
    result: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run(config, task_status=task_status))
            result["value"] = await trio.to_thread.run_sync(body, config.rpc.socket)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result["value"]


def test_contribute_list_merge_remove(tmp_path: Path) -> None:
    def body(sock: Path) -> None:
        with Client(sock) as c:
            created = c.create_set("test/rpc", SPEC)
            assert created["id"].startswith("bafyrei")
            f = tmp_path / "m1.safetensors"
            f.write_bytes(model(1))
            first = c.contribute("test/rpc", f, weight=3, meta={"step": 10})  # as a descriptor
            second = c.contribute(created["id"], model(2), weight=1)  # inline, by set id
            assert first["seq"] == 0 and second["seq"] == 1
            listed = c.contributions("test/rpc")
            assert {x["id"] for x in listed} == {first["id"], second["id"]}
            assert all(x["live"] and x["have_tensors"] for x in listed)
            out = tmp_path / "merged.safetensors"
            summary = c.merge("test/rpc", output=out)
            merged, _ = tensorfile.loads(out.read_bytes())
            a1, _ = tensorfile.loads(model(1))
            a2, _ = tensorfile.loads(model(2))
            for name in SHAPES:
                expect = (0.75 * a1[name].astype(np.float64) + 0.25 * a2[name].astype(np.float64)).astype(
                    np.float32
                )
                if summary["contributions"] == 2:
                    assert np.allclose(merged[name], expect, atol=1e-6)
            inline = c.merge("test/rpc")
            assert inline["sha256"] == summary["sha256"] and isinstance(inline["data"], bytes)
            c.remove("test/rpc", first["id"])
            assert c.sets()[0]["live"] == 1
            assert c.status()["sets"] == 1

    with_daemon(tmp_path, body)


def test_errors_are_reported_and_the_connection_stays_usable(tmp_path: Path) -> None:
    def body(sock: Path) -> None:
        with Client(sock) as c:
            c.create_set("test/rpc", SPEC)
            cases = [
                (lambda: c.contribute("nope", model(1)), "unknown_set"),
                (lambda: c.contribute("test/rpc", b"not safetensors"), "bad_tensors"),
                (
                    lambda: c.call("contribute", {"set": "test/rpc", "data": model(1), "weight": "3"}),
                    "bad_request",
                ),
                (
                    lambda: c.call("contribute", {"set": "test/rpc", "data": model(1), "weight": 0}),
                    "bad_request",
                ),
                (lambda: c.call("frobnicate"), "unknown_method"),
                (lambda: c.call("sets.create", {"schema": {"v": 1}}), "bad_schema"),
                (lambda: c.merge("test/rpc"), "empty_set"),
            ]
            wrong = tensorfile.dumps(
                {"a": np.zeros((8, 5), np.float32), "b": np.zeros(16, np.float32)}, {"a": "F32", "b": "F32"}
            )
            cases.append((lambda: c.contribute("test/rpc", wrong), "schema_mismatch"))
            for call, code in cases:
                with pytest.raises(RpcError) as info:
                    call()
                assert info.value.code == code, (code, info.value)
            assert c.status()["sets"] == 1  # same connection still works

    with_daemon(tmp_path, body)


def test_garbage_and_oversized_frames_close_only_that_connection(tmp_path: Path) -> None:
    def body(sock: Path) -> None:
        for junk in (b"\xff\xff\xff\xff" + b"x" * 16, b"\x00\x00\x00\x02\xff\xff", os.urandom(64)):
            raw = socket.socket(socket.AF_UNIX)
            raw.connect(str(sock))
            raw.sendall(junk)
            raw.settimeout(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    if raw.recv(4096) == b"":
                        break
                except (ConnectionResetError, TimeoutError):
                    break
            raw.close()
        with Client(sock) as c:
            assert c.status()["sets"] == 0

    with_daemon(tmp_path, body)


def test_state_survives_a_restart(tmp_path: Path) -> None:
    def first(sock: Path) -> str:
        with Client(sock) as c:
            c.create_set("test/rpc", SPEC)
            c.contribute("test/rpc", model(1))
            return str(c.merge("test/rpc")["sha256"])

    def second(sock: Path) -> str:
        with Client(sock) as c:
            assert c.sets()[0]["live"] == 1
            again = c.contribute("test/rpc", model(2))
            assert again["seq"] == 1  # the sequence number was never reused
            c.remove("test/rpc", again["id"])
            return str(c.merge("test/rpc")["sha256"])

    assert with_daemon(tmp_path, first) == with_daemon(tmp_path, second)


def test_gc_frees_removed_contributions_and_the_quota_refuses_what_does_not_fit(tmp_path: Path) -> None:
    size = len(model(1))
    stray = tmp_path / "data" / "store" / "blobs" / ".partial" / f"{'ab' * 36}.part"

    def body(sock: Path) -> None:
        with Client(sock) as c:
            status = c.status()
            assert status["blob_quota_bytes"] == 2 * size and status["blob_bytes"] == 0
            assert not stray.exists(), "the collection on start removes partial writes nobody needs"
            c.create_set("test/rpc", SPEC)
            first = c.contribute("test/rpc", model(1))
            c.contribute("test/rpc", model(2))
            with pytest.raises(RpcError) as err:
                c.contribute("test/rpc", model(3))
            assert err.value.code == "quota_exceeded" and "blob_quota_bytes" in err.value.message
            assert c.status()["blob_bytes"] == 2 * size and c.sets()[0]["live"] == 2
            c.remove("test/rpc", first["id"])
            freed = c.gc()
            assert freed["blobs_removed"] == 1 and freed["bytes_freed"] == size and freed["blobs_kept"] == 1
            assert c.status()["blob_bytes"] == size
            third = c.contribute("test/rpc", model(3))  # fits again
            listed = {x["id"]: x for x in c.contributions("test/rpc")}
            assert not listed[first["id"]]["have_tensors"] and listed[third["id"]]["have_tensors"]
            assert c.merge("test/rpc")["contributions"] == 2
            again = c.gc()
            assert again["blobs_removed"] == 0 and again["blobs_kept"] == 2

    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"left by a crash")
    with_daemon(tmp_path, body, blob_quota_bytes=2 * size)


@pytest.mark.root
def test_a_full_disk_is_a_storage_error_and_the_daemon_keeps_serving(tmp_path: Path) -> None:
    """A real 1 MiB tmpfs as the data directory: a 2 MiB model cannot be stored."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], check=True)
    big_spec = {"w": ("F32", (512, 1024))}
    big = tensorfile.dumps({"w": np.ones((512, 1024), np.float32)}, {"w": "F32"})

    def body(sock: Path) -> None:
        with Client(sock) as c:
            c.create_set("test/full", big_spec)
            with pytest.raises(RpcError) as err:
                c.contribute("test/full", big)
            assert err.value.code == "storage_error"
            assert "No space left on device" in err.value.message
            assert c.sets()[0]["live"] == 0, "a contribution whose tensors were not stored is not recorded"
            c.create_set("test/rpc", SPEC)
            small = c.contribute("test/rpc", model(1))  # the daemon still serves and stores what fits
            assert [x["id"] for x in c.contributions("test/rpc")] == [small["id"]]

    try:
        with_daemon(tmp_path, body)
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
