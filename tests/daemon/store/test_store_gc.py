"""Blob quota and garbage collection: refuse before writing, collect only the dead."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmerge.daemon.store import QuotaExceeded, StoreError, StoreLimits
from tests.crdt.pool import POOL
from tests.daemon.store.helpers import blob_of, live_state, open_store

A, B, C = POOL.adds[0], POOL.adds[1], POOL.adds[2]


def parts(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs" / ".partial").iterdir())


def on_disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "blobs").glob("[0-9a-f][0-9a-f]/*.safetensors"))


def test_quota_limit_validates() -> None:
    with pytest.raises(ValueError, match=r"StoreLimits\.blob_quota_bytes must be a positive integer"):
        StoreLimits(blob_quota_bytes=0).validate()
    assert StoreLimits(blob_quota_bytes=None).validate().blob_quota_bytes is None


def test_usage_is_counted_and_recomputed_on_open(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert (store.blob_usage().blobs, store.blob_usage().bytes) == (0, 0)
        store.put_blob(A.header, blob_of(A))
        store.put_blob(A.header, blob_of(A))  # already stored: counted once
        with store.blob_writer(B.header) as w:
            data = blob_of(B)
            w.write(0, data)
            assert store.blob_usage().reserved_bytes >= len(data)
            w.finish()
        usage = store.blob_usage()
        assert usage.blobs == 2 and usage.bytes == len(blob_of(A)) + len(blob_of(B)) == on_disk_bytes(
            tmp_path
        )
        assert usage.reserved_bytes == 0 and usage.quota_bytes is None
    with open_store(tmp_path) as store:
        assert store.blob_usage() == usage


def test_quota_refuses_puts_and_writers_before_writing(tmp_path: Path) -> None:
    size_a = len(blob_of(A))
    with open_store(tmp_path, blob_quota_bytes=size_a + len(blob_of(B)) // 2) as store:
        store.put_blob(A.header, blob_of(A))
        with pytest.raises(
            QuotaExceeded, match=r"needs \d+ bytes but blobs use \d+ of the \d+-byte quota"
        ) as err:
            store.put_blob(B.header, blob_of(B))
        assert "blob_quota_bytes" in str(err.value)
        assert err.value.used == size_a and err.value.need == len(blob_of(B))
        with pytest.raises(QuotaExceeded):
            store.blob_writer(B.header)  # reserves the largest size the manifest allows
        assert not store.has_blob(B.id)
        assert list((tmp_path / "blobs" / ".tmp").iterdir()) == [] and parts(tmp_path) == []
        assert store.blob_usage().bytes == size_a and store.blob_usage().reserved_bytes == 0
        # re-storing what is already there takes no room
        store.put_blob(A.header, blob_of(A))
        store.blob_writer(A.header).abort()
        # collecting A frees its room for B
        report = store.collect_garbage(keep=set())
        assert report.removed == [A.id] and report.bytes_freed == size_a
        store.put_blob(B.header, blob_of(B))
        assert store.has_blob(B.id) and store.blob_usage().bytes == len(blob_of(B))


def test_open_writers_hold_their_reservation_until_closed(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        w = store.blob_writer(A.header)
        room = store.blob_usage().reserved_bytes
        assert room >= len(blob_of(A))
        w.close()
    quota = room + len(blob_of(B)) - 1
    with open_store(tmp_path, blob_quota_bytes=quota) as store:
        w = store.blob_writer(A.header)
        with pytest.raises(QuotaExceeded, match="reserved by writes in progress"):
            store.put_blob(B.header, blob_of(B))
        w.abort()
        store.put_blob(B.header, blob_of(B))


def test_collect_removes_only_what_is_not_kept(tmp_path: Path) -> None:
    state = live_state()
    live = set(state.live_ids())
    dead = [a for a in POOL.adds if a.id not in live]
    assert len(dead) >= 2, "the pool has removed and convicted contributions"
    writing = dead[-1]
    partial = tmp_path / "blobs" / ".partial"
    some_live = min(live)
    with open_store(tmp_path) as store:
        for a in POOL.adds:
            if a is not writing:
                store.put_blob(a.header, blob_of(a))
        # idle parts: a resumable fetch of a live id, a dead id's, a stray name
        (partial / f"{some_live.hex()}.part").write_bytes(b"resume me")
        (partial / f"{dead[0].id.hex()}.part").write_bytes(b"dead")
        (partial / "junk.part").write_bytes(b"junk")
        active = store.blob_writer(writing.header)  # a write in progress is never touched
        active.write(0, b"abc")
        report = store.collect_garbage(keep=live)
        assert sorted(report.removed) == sorted(a.id for a in dead if a is not writing)
        assert report.blobs_kept == len(live) and report.parts_removed == 2
        assert parts(tmp_path) == sorted([f"{some_live.hex()}.part", f"{writing.id.hex()}.part"])
        assert all(store.has_blob(c) for c in live) and not any(store.has_blob(a.id) for a in dead)
        assert store.blob_usage().bytes == on_disk_bytes(tmp_path)
        assert store.blob_usage().blobs == len(live)
        active.abort()
        again = store.collect_garbage(keep=live)  # idempotent
        assert again.blobs_removed == 0 and again.parts_removed == 0


def test_collect_garbage_keeps_the_live_ids_of_every_set(tmp_path: Path) -> None:
    state = live_state()
    with open_store(tmp_path) as store:
        store.add_set(state.schema)
        store.append(state.set_id, state.full_state())
        for a in POOL.adds:
            store.put_blob(a.header, blob_of(a))
        report = store.collect_garbage()
        assert sorted(report.removed) == sorted(a.id for a in POOL.adds if not state.orset.is_live(a.id))
        assert all(store.has_blob(c) for c in state.live_ids())


def test_blobs_published_during_a_collection_are_spared(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put_blob(A.header, blob_of(A))
        mark = store.begin_blob_collection()
        with pytest.raises(StoreError, match="already running"):
            store.begin_blob_collection()
        # the caller computed `keep` before these arrived: they must survive anyway
        store.put_blob(B.header, blob_of(B))
        with store.blob_writer(C.header) as w:
            w.write(0, blob_of(C))
            w.finish()
        report = store.collect_blobs(set(), mark)
        assert report.removed == [A.id]
        assert store.has_blob(B.id) and store.has_blob(C.id)
        # the next collection does not spare them any more
        assert sorted(store.collect_garbage(keep=set()).removed) == sorted([B.id, C.id])


def test_quarantined_blobs_leave_the_usage(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put_blob(A.header, blob_of(A))
        store.blob_path(A.id).write_bytes(b"\xff" * 16)
        assert store.get_tensors(A.id) is None
        assert store.blob_usage().blobs == 0 and store.blob_usage().bytes == 0


def test_what_cannot_be_deleted_is_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_store(tmp_path) as store:
        (tmp_path / "blobs" / ".partial" / "odd.part").mkdir()  # unlink fails on a directory
        store.put_blob(A.header, blob_of(A))
        report = store.collect_garbage(keep=set())
        assert report.removed == [A.id] and report.parts_removed == 0
        assert "cannot delete stale partial write" in caplog.text
