"""Blobs: verification before visibility, resumable writers, zero-copy reads."""

from __future__ import annotations

import mmap
import threading
from pathlib import Path

import numpy as np
import pytest

from meshmerge.crdt import MergeState, verify_tensors
from meshmerge.crdt.tensorfile import dumps
from meshmerge.daemon.store import BlobRejected, Store, StoreError
from meshmerge.daemon.store.blobs import PARALLEL_SYNC_BYTES
from meshmerge.proto.messages import ContributionHeader, SetSchema, TensorEntry
from tests.crdt.factories import signer
from tests.crdt.pool import POOL
from tests.daemon.store.helpers import blob_of, open_store

ADD = POOL.adds[0]
HEADER = ADD.header
CID = ADD.id


def visible_files(root: Path) -> list[Path]:
    """Files a reader could see as blobs (not temporaries or parts)."""
    return [p for p in (root / "blobs").rglob("*.safetensors") if not p.parent.name.startswith(".")]


def test_put_then_read_zero_copy(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        assert not store.has_blob(CID) and store.get_tensors(CID) is None
        store.put_blob(HEADER, blob_of(ADD))
        store.put_blob(HEADER, blob_of(ADD))  # idempotent
        assert store.has_blob(CID)
        path = store.blob_path(CID)
        assert path.read_bytes() == blob_of(ADD) and path.name == f"{CID.hex()}.safetensors"
        tensors = store.get_tensors(CID)
        assert tensors is not None
        verify_tensors(HEADER, tensors)
        for name, array in tensors.items():
            assert not array.flags.writeable
            np.testing.assert_array_equal(array, POOL.blobs[CID][name])
            base = array
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            assert isinstance(getattr(base, "obj", base), mmap.mmap)
    with open_store(tmp_path) as store:
        assert store.has_blob(CID)


def test_blob_path_rejects_non_cids(tmp_path: Path) -> None:
    with open_store(tmp_path) as store, pytest.raises(StoreError, match="CIDv1"):
        store.blob_path(b"../../etc/passwd")


def mismatching() -> dict[str, bytes]:
    good = POOL.blobs[CID]
    dtypes = {e.name: e.dtype for e in HEADER.tensors}
    other = {k: v.copy() for k, v in good.items()}
    other["layer.0.bias"][0] += 1
    missing = {k: v for k, v in good.items() if k != "layer.0.bias"}
    as_f16 = {k: v.astype(np.float16) for k, v in good.items()}
    return {
        "changed value": dumps(other, dtypes),
        "missing tensor": dumps(missing, dtypes),
        "other dtype": dumps(as_f16, dict.fromkeys(good, "F16")),
        "not safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        "empty": b"",
        "trailing bytes": blob_of(ADD) + b"\x00",
    }


@pytest.mark.parametrize("case", list(mismatching()))
def test_put_rejects_mismatching_bytes_and_leaves_no_trace(tmp_path: Path, case: str) -> None:
    with open_store(tmp_path) as store:
        with pytest.raises(BlobRejected, match="blob of"):
            store.put_blob(HEADER, mismatching()[case])
        assert not store.has_blob(CID) and visible_files(tmp_path) == []
        assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def test_put_rejects_oversize(tmp_path: Path) -> None:
    with (
        open_store(tmp_path, max_blob_bytes=64) as store,
        pytest.raises(BlobRejected, match="max_blob_bytes"),
    ):
        store.put_blob(HEADER, blob_of(ADD))
    small_header = open_store(tmp_path, max_blob_header_base=1, max_blob_header_per_tensor=1)
    with small_header as store, pytest.raises(BlobRejected, match="over its limit"):
        store.put_blob(HEADER, blob_of(ADD))


def test_chunked_writer_resumes_and_publishes(tmp_path: Path) -> None:
    data = blob_of(ADD)
    with open_store(tmp_path) as store:
        with store.blob_writer(HEADER) as w:
            assert w.offset() == 0
            assert w.write(0, data[:100]) == 100
        assert not store.has_blob(CID)
    with open_store(tmp_path) as store:  # resumes after a restart
        w = store.blob_writer(HEADER)
        assert w.offset() == 100
        with pytest.raises(BlobRejected, match="out of order"):
            w.write(50, data[50:])
        with pytest.raises(BlobRejected, match="exceed its limit"):
            w.write(100, b"\x00" * w.limit)
        for off in range(100, len(data), 37):
            w.write(off, data[off : off + 37])
        assert w.finish() == store.blob_path(CID)
        assert store.has_blob(CID) and store.blob_path(CID).read_bytes() == data
        assert list((tmp_path / "blobs" / ".partial").iterdir()) == []
        with pytest.raises(StoreError, match="closed"):
            w.write(w.offset(), b"x")


def test_writer_rejects_bad_content_at_finish(tmp_path: Path) -> None:
    bad = mismatching()["changed value"]
    with open_store(tmp_path) as store:
        w = store.blob_writer(HEADER)
        w.write(0, bad)
        with pytest.raises(BlobRejected, match="sha-256"):
            w.finish()
        assert not store.has_blob(CID) and list((tmp_path / "blobs" / ".partial").iterdir()) == []
        short = store.blob_writer(HEADER)
        short.write(0, b"\x01")
        with pytest.raises(BlobRejected, match="only 1 bytes"):
            short.finish()


def test_writer_abort_and_concurrency_limits(tmp_path: Path) -> None:
    with open_store(tmp_path, max_blob_writers=1) as store:
        w = store.blob_writer(HEADER)
        w.write(0, b"abc")
        with pytest.raises(StoreError, match="already being written"):
            store.blob_writer(HEADER)
        with pytest.raises(StoreError, match="max_blob_writers"):
            store.blob_writer(POOL.adds[1].header)
        w.abort()
        assert list((tmp_path / "blobs" / ".partial").iterdir()) == []
        w2 = store.blob_writer(HEADER)
        assert w2.offset() == 0
        w2.close()


def test_finish_when_already_stored_discards_the_part(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        w = store.blob_writer(HEADER)
        w.write(0, b"partial")
        store.put_blob(HEADER, blob_of(ADD))
        assert w.finish() == store.blob_path(CID)
        assert list((tmp_path / "blobs" / ".partial").iterdir()) == []


def test_damaged_blob_on_disk_is_quarantined(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.put_blob(HEADER, blob_of(ADD))
        store.blob_path(CID).write_bytes(b"\xff" * 16)
        assert store.get_tensors(CID) is None
        assert not store.has_blob(CID) and store.counters.damaged_blobs == 1
        assert (tmp_path / "blobs" / ".damaged" / store.blob_path(CID).name).exists()


def test_parallel_puts_from_threads(tmp_path: Path) -> None:
    """The daemon calls the store from worker threads: concurrent puts and appends are safe."""
    errors: list[BaseException] = []
    with open_store(tmp_path) as store:

        def put(i: int) -> None:
            try:
                add = POOL.adds[i % len(POOL.adds)]
                store.put_blob(add.header, blob_of(add))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(i,)) for i in range(3 * len(POOL.adds))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all(store.has_blob(a.id) for a in POOL.adds)


def test_store_open_cleans_blob_temporaries(tmp_path: Path) -> None:
    with open_store(tmp_path):
        pass
    (tmp_path / "blobs" / ".tmp" / ".x.safetensors.abc.tmp").write_bytes(b"junk")
    with Store.open(tmp_path, fsync=False):
        assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


@pytest.mark.parametrize("valid", [True, False])
def test_large_blob_is_verified_while_fsyncing(tmp_path: Path, valid: bool) -> None:
    """Blobs over PARALLEL_SYNC_BYTES are hashed in parallel with their fsync; a bad one is
    still rejected before anything is visible."""
    n = PARALLEL_SYNC_BYTES // 4 + 1024
    sch = SetSchema("big/set", "weights", (TensorEntry("w", "F32", (n,)),))
    good = {"w": np.arange(n, dtype=np.float32)}
    signed = MergeState(sch).contribute(signer(0), good, seq=0)
    sent = good if valid else {"w": np.arange(n, dtype=np.float32)[::-1].copy()}
    data = dumps(sent, {"w": "F32"})
    assert len(data) > PARALLEL_SYNC_BYTES
    with Store.open(tmp_path, fsync=True) as store:
        for put in (
            lambda: store.put_blob(signed.header, data),
            lambda: chunked(store, signed.header, data),
        ):
            if valid:
                put()
                assert store.has_blob(signed.id)
            else:
                with pytest.raises(BlobRejected, match="sha-256"):
                    put()
                assert not store.has_blob(signed.id) and visible_files(tmp_path) == []
                assert list((tmp_path / "blobs" / ".tmp").iterdir()) == []


def chunked(store: Store, header: ContributionHeader, data: bytes) -> None:
    with store.blob_writer(header) as w:
        for off in range(0, len(data), 1 << 20):
            w.write(off, data[off : off + (1 << 20)])
        w.finish()


def test_dropped_writer_releases_its_slot(tmp_path: Path) -> None:
    with open_store(tmp_path, max_blob_writers=1) as store:
        w = store.blob_writer(HEADER)
        w.write(0, blob_of(ADD)[:10])
        del w
        resumed = store.blob_writer(HEADER)
        assert resumed.offset() == 10
        resumed.abort()
