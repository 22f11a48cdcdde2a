"""An open append-only record file (op log, snapshot or sequence log).

Appends are one ``pwrite`` per record at the known end of the file followed by
one ``fdatasync``; only when that returns is the append acknowledged. If any
step fails the file is cut back to its previous end (so a half-written
record can never sit in front of later good ones) and the file refuses
further appends: after a failed fsync the kernel may have dropped dirty pages
and reported the error only once, so the only safe continuation is to reopen
the store, which re-verifies everything on disk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from meshmerge.daemon.store.atomic import FILE_MODE, pwrite_all
from meshmerge.daemon.store.errors import CorruptRecord, StoreError
from meshmerge.daemon.store.records import (
    Buffer,
    FileHeader,
    FileKind,
    Scan,
    encode_file_header,
    encode_record,
    parse_file_header,
    scan,
)


class RecordFile:
    """Append-only writer over one record file; see the module docstring."""

    def __init__(self, path: Path, fd: int, header: FileHeader, size: int, max_len: int, fsync: bool) -> None:
        self.path = path
        self.header = header
        self.size = size
        self.max_len = max_len
        self._fd: int | None = fd
        self._fsync = fsync
        self.failed: str | None = None

    @property
    def gen(self) -> int:
        return self.header.gen

    @classmethod
    def create(cls, path: Path, kind: FileKind, gen: int, *, max_len: int, fsync: bool) -> RecordFile:
        """Create (or truncate) ``path`` with a fresh header and salt; the caller fsyncs the directory."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            raw = encode_file_header(kind, gen, secrets.token_bytes(16))
            pwrite_all(fd, raw, 0)
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, parse_file_header(raw, kind), len(raw), max_len, fsync)

    @classmethod
    def open(cls, path: Path, kind: FileKind, *, max_len: int, fsync: bool) -> tuple[RecordFile, Scan]:
        """Open for appending after recovery: returns the file and what its scan found.

        A torn tail (``scan.tail_bytes``) is cut off durably before the file
        is returned, so new records follow the last valid one. Damaged
        regions between valid records are left in place and reported.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            header, found = _read(fd, path, kind, max_len)
            if found.tail_bytes:
                os.ftruncate(fd, found.end)
                if fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, found.end, max_len, fsync), found

    @contextlib.contextmanager
    def mapped(self) -> Iterator[Buffer]:
        """The file's bytes up to the last appended record (read-only map)."""
        with _map(self._require_fd(), self.size) as buf:
            yield buf

    def append(self, payloads: Sequence[bytes]) -> None:
        """Durably append one record per payload (atomic per record, synced once)."""
        if self.failed is not None:
            raise StoreError(f"{self.path}: an earlier write failed ({self.failed}); reopen the store")
        fd = self._require_fd()
        offset = self.size
        try:
            for payload in payloads:
                record = encode_record(self.header.salt, payload, self.max_len)
                pwrite_all(fd, record, offset)
                offset += len(record)
            if self._fsync:
                os.fdatasync(fd)
        except CorruptRecord as exc:
            self._cut_back()
            raise StoreError(f"{self.path}: {exc}") from None
        except OSError as exc:
            self._cut_back()
            self.failed = str(exc)
            raise StoreError(f"{self.path}: write failed: {exc}") from exc
        self.size = offset

    def _cut_back(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._require_fd(), self.size)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise StoreError(f"{self.path} is closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def read_records(path: Path, kind: FileKind, max_len: int) -> Iterator[tuple[FileHeader, Buffer, Scan]]:
    """Map a record file read-only and scan it (no repair)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        with _map(fd, size) as buf:
            header = _header(buf, path, kind)
            yield header, buf, scan(buf, header.salt, max_len)
    finally:
        os.close(fd)


def _read(fd: int, path: Path, kind: FileKind, max_len: int) -> tuple[FileHeader, Scan]:
    size = os.fstat(fd).st_size
    with _map(fd, size) as buf:
        header = _header(buf, path, kind)
        return header, scan(buf, header.salt, max_len)


def _header(buf: Buffer, path: Path, kind: FileKind) -> FileHeader:
    try:
        return parse_file_header(buf, kind)
    except CorruptRecord as exc:
        raise StoreError(
            f"{path}: {exc}. The file cannot be verified; move it away to start this part empty."
        ) from None


@contextlib.contextmanager
def _map(fd: int, size: int) -> Iterator[Buffer]:
    if size == 0:
        yield b""
        return
    mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):
            mm.close()
