"""Content-addressed tensor blobs (safetensors), verified before they are visible.

A blob lives at ``blobs/<shard>/<cid hex>.safetensors`` where the cid is the
contribution id; the header's manifest pins the sha-256 of every tensor, so
a file is published under a cid only after :func:`verify` proved that its
tensors are exactly the manifest's. Readers therefore trust what they find
and map it read-only without hashing again.

Publishing is ``tmp (or .part) -> fsync -> rename -> fsync dir``: a crash
leaves either no blob or the whole verified blob. Verification runs while the
temporary is being fsynced (:func:`verify_while_syncing`) and the rename waits
for both, so a rejected blob costs one write of at most its size limit to a
temporary that is deleted, and never becomes visible. Resumable network fetches
write ``.partial/<cid hex>.part`` with :class:`BlobWriter`; a part is never
fsynced chunk by chunk (it is not acknowledged data), and whatever a crash
leaves in it is caught by the verification in :meth:`BlobWriter.finish`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import re
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy.typing as npt

from meshmerge.crdt import TensorMismatch, verify_tensors
from meshmerge.crdt.tensorfile import TensorFileError, loads
from meshmerge.daemon.store.atomic import (
    FILE_MODE,
    fsync_dir,
    make_dirs,
    pwrite_all,
    remove_tmp_files,
    tmp_name,
)
from meshmerge.daemon.store.errors import BlobRejected, QuotaExceeded, StoreError
from meshmerge.daemon.store.limits import StoreLimits
from meshmerge.proto.cid import CidError, check_cid
from meshmerge.proto.messages import ContributionHeader

log = logging.getLogger("meshmerge.store")

Tensors = dict[str, npt.NDArray[Any]]

_BLOB_NAME = re.compile(r"([0-9a-f]{72})\.safetensors")
_PART_NAME = re.compile(r"([0-9a-f]{72})\.part")
_SHARD = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True)
class BlobUsage:
    """Disk use of the published blobs, against the quota (None: no quota)."""

    blobs: int
    bytes: int
    reserved_bytes: int
    quota_bytes: int | None


@dataclass
class CollectionReport:
    """What one garbage collection removed and kept."""

    blobs_removed: int = 0
    bytes_freed: int = 0
    parts_removed: int = 0
    part_bytes_freed: int = 0
    blobs_kept: int = 0
    #: ids of the removed blobs (for logs and tests)
    removed: list[bytes] = field(default_factory=list)


class CollectionMark:
    """Ids published since :meth:`BlobStore.begin_collection`; those are spared."""

    def __init__(self) -> None:
        self.published: set[bytes] = set()


def short(cid: bytes) -> str:
    return cid.hex()[8:24] + "…"


def verify(header: ContributionHeader, buffer: Any) -> None:
    """Raise BlobRejected unless ``buffer`` is a safetensors file holding exactly the manifest."""
    reason = _mismatch(header, buffer)
    if reason is not None:
        raise BlobRejected(f"blob of {short(header.id)}: {reason}")


#: Below this size a blob is verified and fsynced one after the other (a thread costs more).
PARALLEL_SYNC_BYTES = 4 * 1024 * 1024


def verify_while_syncing(header: ContributionHeader, buffer: Any, fd: int | None) -> None:
    """Verify ``buffer`` while ``fd`` (holding the same bytes, not yet visible) is fsynced.

    Hashing (sha-256) and fsync both release the GIL, so a large put costs
    about max(hash, flush) instead of their sum. Nothing is published
    before both are done, so verification still precedes visibility.
    """
    if fd is None:
        verify(header, buffer)
        return
    if len(buffer) < PARALLEL_SYNC_BYTES:
        verify(header, buffer)
        os.fsync(fd)
        return
    failure: list[OSError] = []

    def flush() -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            failure.append(exc)

    syncer = threading.Thread(target=flush, name="meshmerge-blob-fsync")
    syncer.start()
    try:
        verify(header, buffer)
    finally:
        syncer.join()
    if failure:
        raise failure[0]


def _mismatch(header: ContributionHeader, buffer: Any) -> str | None:
    # Returns instead of raising so no traceback keeps views of ``buffer``
    # alive: the caller must be able to close a memory map right after.
    try:
        arrays, dtypes = loads(buffer)
    except TensorFileError as exc:
        return f"not a valid safetensors file: {exc}"
    try:
        for entry in header.tensors:
            if dtypes.get(entry.name, entry.dtype) != entry.dtype:
                return f"tensor {entry.name!r} is stored as {dtypes[entry.name]}, the manifest says {entry.dtype}"
        verify_tensors(header, arrays)
    except TensorMismatch as exc:
        return str(exc)
    finally:
        arrays.clear()
    return None


class BlobStore:
    def __init__(self, root: Path, limits: StoreLimits, *, fsync: bool) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.partial = root / ".partial"
        self.damaged = root / ".damaged"
        self.limits = limits
        self.fsync = fsync
        #: open writers: cid -> bytes reserved for it
        self._writers: dict[bytes, int] = {}
        #: puts in progress: token -> bytes reserved for it
        self._puts: dict[int, int] = {}
        self._tokens = itertools.count()
        self._lock = threading.Lock()
        self._mark: CollectionMark | None = None
        self.damaged_count = 0
        for d in (root, self.tmp, self.partial, self.damaged):
            make_dirs(d, fsync=fsync)
        remove_tmp_files(self.tmp)
        #: size of every published blob as stored (so damage that changes a size cannot skew the sum)
        self._sizes: dict[bytes, int] = {}
        for cid, path in self._published_files():
            with contextlib.suppress(FileNotFoundError):
                self._sizes[cid] = path.stat().st_size
        self._used = sum(self._sizes.values())

    # -- naming ----------------------------------------------------------------

    def path(self, cid: bytes) -> Path:
        try:
            check_cid(cid)
        except CidError as exc:
            raise StoreError(str(exc)) from None
        name = cid.hex()
        return self.root / name[8:10] / f"{name}.safetensors"

    def has(self, cid: bytes) -> bool:
        return self.path(cid).is_file()

    def max_size(self, header: ContributionHeader) -> int:
        """Largest acceptable file for this header: tensor bytes plus a bounded JSON header."""
        payload = sum(t.size for t in header.tensors)
        room = self.limits.max_blob_header_base + self.limits.max_blob_header_per_tensor * len(header.tensors)
        return 8 + payload + room

    def _check_size(self, header: ContributionHeader) -> int:
        need = 8 + sum(t.size for t in header.tensors)
        if need > self.limits.max_blob_bytes:
            raise BlobRejected(
                f"blob of {short(header.id)}: its manifest needs {need} bytes, over "
                f"StoreLimits.max_blob_bytes={self.limits.max_blob_bytes}"
            )
        return min(self.max_size(header), self.limits.max_blob_bytes)

    # -- writing -----------------------------------------------------------------

    def put(self, header: ContributionHeader, data: bytes | memoryview) -> Path:
        limit = self._check_size(header)
        final = self.path(header.id)
        if final.is_file():
            return final
        if len(data) > limit:
            raise BlobRejected(f"blob of {short(header.id)}: {len(data)} bytes, over its limit of {limit}")
        with self._lock:
            self._reserve(f"blob of {short(header.id)}", len(data))
            token = next(self._tokens)
            self._puts[token] = len(data)
        try:
            tmp = tmp_name(self.tmp / final.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                try:
                    pwrite_all(fd, data, 0)
                    verify_while_syncing(header, data, fd if self.fsync else None)
                finally:
                    os.close(fd)
                self._publish(tmp, final, header.id, len(data))
            except BlobRejected:
                os.unlink(tmp)
                raise
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise StoreError(f"cannot store blob of {short(header.id)}: {exc}") from exc
        finally:
            with self._lock:
                del self._puts[token]
        return final

    def _reserve(self, what: str, need: int) -> None:
        """Raise QuotaExceeded unless ``need`` more bytes fit the quota (caller holds the lock)."""
        quota = self.limits.blob_quota_bytes
        if quota is None:
            return
        reserved = sum(self._writers.values()) + sum(self._puts.values())
        if self._used + reserved + need > quota:
            raise QuotaExceeded(what, need, self._used, reserved, quota)

    def _publish(self, src: Path, final: Path, cid: bytes, size: int) -> None:
        make_dirs(final.parent, fsync=self.fsync)
        with self._lock:  # the rename and the accounting (and the collector's view) change together
            os.replace(src, final)
            self._used += size - self._sizes.get(cid, 0)
            self._sizes[cid] = size
            if self._mark is not None:
                self._mark.published.add(cid)
        if self.fsync:
            fsync_dir(final.parent)
            fsync_dir(src.parent)

    def writer(self, header: ContributionHeader) -> BlobWriter:
        limit = self._check_size(header)
        cid = header.id
        with self._lock:
            if cid in self._writers:
                raise StoreError(f"blob of {short(cid)} is already being written")
            if len(self._writers) >= self.limits.max_blob_writers:
                raise StoreError(
                    f"{len(self._writers)} blob writers open (StoreLimits.max_blob_writers); finish or abort one"
                )
            if not self.path(cid).is_file():  # finishing an already stored blob takes no room
                self._reserve(f"blob of {short(cid)}", limit)
            self._writers[cid] = limit
        try:
            part = self.partial / f"{cid.hex()}.part"
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            size = os.fstat(fd).st_size
            if size > limit:
                os.ftruncate(fd, 0)
                size = 0
        except BaseException:
            self._release(cid)
            raise
        return BlobWriter(self, header, part, fd, size, limit)

    def _release(self, cid: bytes) -> None:
        with self._lock:
            self._writers.pop(cid, None)

    # -- usage and garbage collection --------------------------------------------------

    def usage(self) -> BlobUsage:
        with self._lock:
            reserved = sum(self._writers.values()) + sum(self._puts.values())
            return BlobUsage(len(self._sizes), self._used, reserved, self.limits.blob_quota_bytes)

    def _published_files(self) -> list[tuple[bytes, Path]]:
        out = []
        for shard in self.root.iterdir():
            if not (_SHARD.fullmatch(shard.name) and shard.is_dir()):
                continue
            for path in shard.iterdir():
                m = _BLOB_NAME.fullmatch(path.name)
                if m:
                    out.append((bytes.fromhex(m.group(1)), path))
        return out

    def begin_collection(self) -> CollectionMark:
        """Start recording published ids; call before computing what to keep."""
        with self._lock:
            if self._mark is not None:
                raise StoreError("a blob collection is already running")
            self._mark = CollectionMark()
            return self._mark

    def collect(self, keep: Collection[bytes], mark: CollectionMark) -> CollectionReport:
        """Delete blobs and idle ``.part`` files whose id is not in ``keep``; see the module docstring."""
        report = CollectionReport()
        try:
            touched: set[Path] = set()
            for cid, path in self._published_files():
                with self._lock:
                    if cid in keep or cid in mark.published or cid in self._writers:
                        report.blobs_kept += 1
                        continue
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:  # e.g. permissions changed by hand: report, keep going
                        log.warning("cannot delete unreferenced blob %s: %s", path, exc)
                        continue
                    size = self._sizes.pop(cid, 0)
                    self._used -= size
                report.blobs_removed += 1
                report.bytes_freed += size
                report.removed.append(cid)
                touched.add(path.parent)
            for path in self.partial.iterdir():
                m = _PART_NAME.fullmatch(path.name)
                with self._lock:
                    owner = bytes.fromhex(m.group(1)) if m else None
                    if owner is not None and (owner in keep or owner in self._writers):
                        continue
                    try:
                        size = path.stat().st_size
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        log.warning("cannot delete stale partial write %s: %s", path, exc)
                        continue
                report.parts_removed += 1
                report.part_bytes_freed += size
                touched.add(self.partial)
            if self.fsync:
                for directory in touched:
                    fsync_dir(directory)
        finally:
            with self._lock:
                if self._mark is mark:
                    self._mark = None
        return report

    # -- reading -------------------------------------------------------------------

    def get_tensors(self, cid: bytes) -> Tensors | None:
        path = self.path(cid)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < 8:
                raise TensorFileError("file shorter than its 8-byte header length")
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            arrays, _ = loads(mm)
            return arrays
        except (TensorFileError, ValueError) as exc:
            self._quarantine(path, str(exc))
            return None
        finally:
            os.close(fd)

    def _quarantine(self, path: Path, reason: str) -> None:
        """A published blob no longer parses (disk damage): move it aside so it is fetched again."""
        self.damaged_count += 1
        dest = self.damaged / path.name
        log.error(
            "blob %s is damaged on disk (%s); moved to %s, it will be fetched again", path, reason, dest
        )
        cid = bytes.fromhex(path.name.removesuffix(".safetensors"))
        with self._lock, contextlib.suppress(OSError):
            os.replace(path, dest)
            self._used -= self._sizes.pop(cid, 0)  # quarantined files do not count against the quota


class BlobWriter:
    """Resumable chunked write of one blob; see the module docstring.

    Chunks must arrive in order (``write(offset(), chunk)``); the bytes
    already in a ``.part`` from an earlier attempt count, so a fetch resumes
    at :meth:`offset`. :meth:`finish` verifies and publishes; :meth:`abort`
    throws the part away; :meth:`close` (or leaving the ``with`` block) keeps
    it for a later resume.
    """

    def __init__(
        self, store: BlobStore, header: ContributionHeader, part: Path, fd: int, offset: int, limit: int
    ) -> None:
        self.header = header
        self.cid = header.id
        self.limit = limit
        self._store = store
        self._part = part
        self._fd: int | None = fd
        self._offset = offset

    def offset(self) -> int:
        return self._offset

    def write(self, offset: int, chunk: bytes | memoryview) -> int:
        """Append ``chunk`` at ``offset`` (must equal :meth:`offset`); returns the new offset."""
        fd = self._require_fd()
        if offset != self._offset:
            raise BlobRejected(
                f"blob of {short(self.cid)}: chunk at offset {offset}, expected {self._offset} (out of order)"
            )
        if self._offset + len(chunk) > self.limit:
            raise BlobRejected(
                f"blob of {short(self.cid)}: {self._offset + len(chunk)} bytes exceed its limit of {self.limit}"
            )
        try:
            pwrite_all(fd, chunk, offset)
        except OSError as exc:
            raise StoreError(f"cannot write {self._part}: {exc}") from exc
        self._offset += len(chunk)
        return self._offset

    def finish(self) -> Path:
        """Verify the whole part and publish it; BlobRejected (part deleted) if it does not match."""
        fd = self._require_fd()
        final = self._store.path(self.cid)
        try:
            if final.is_file():
                self.abort()
                return final
            os.ftruncate(fd, self._offset)
            if self._offset < 8:
                raise BlobRejected(f"blob of {short(self.cid)}: only {self._offset} bytes")
            mm = mmap.mmap(fd, self._offset, access=mmap.ACCESS_READ)
            try:
                verify_while_syncing(self.header, mm, fd if self._store.fsync else None)
            finally:
                with contextlib.suppress(BufferError):
                    mm.close()
            self._store._publish(self._part, final, self.cid, self._offset)
        except BlobRejected:
            self.abort()
            raise
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot publish blob of {short(self.cid)}: {exc}") from exc
        self.close()
        return final

    def abort(self) -> None:
        """Close and delete the part."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._part)

    def close(self) -> None:
        """Close, keeping the part for a later resume."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._store._release(self.cid)

    def __del__(self) -> None:
        # A writer dropped without close() (e.g. a cancelled fetch) must not hold
        # its fd or keep its cid marked as "being written" forever.
        with contextlib.suppress(Exception):
            self.close()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreError(f"blob writer of {short(self.cid)} is closed")
        return self._fd

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
