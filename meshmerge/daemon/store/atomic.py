"""Crash-safe file primitives: atomic replace, full writes, directory fsync, the lock.

A file becomes visible under its final name only through
``write tmp -> fsync tmp -> rename -> fsync directory``: after a crash at any
step the name holds either the old complete content or the new complete
content, never a mix, and once the directory fsync returns the new content
survives power loss. ``fsync=False`` skips the fsyncs (tests, benchmarks):
the ordering still holds against a process crash (the page cache survives
``kill -9``), only power loss may then lose recent writes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from pathlib import Path

from meshmerge.daemon.store.errors import StoreError, StoreLocked

FILE_MODE = 0o600
DIR_MODE = 0o700
TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, *, fsync: bool) -> None:
    """Create ``path`` and missing parents with mode 0700, fsyncing each new entry's parent."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, DIR_MODE)
            os.chmod(d, DIR_MODE)  # umask may only remove bits; make the mode exact
        if fsync:
            fsync_dir(d.parent)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        view = view[n:]
        offset += n


def tmp_name(path: Path) -> Path:
    """A unique sibling name for a temporary file (removed on open by :func:`remove_tmp_files`)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{TMP_SUFFIX}")


def write_atomic(path: Path, data: bytes | memoryview, *, fsync: bool) -> None:
    """Replace ``path`` with ``data`` atomically (tmp, fsync, rename, fsync dir)."""
    tmp = tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            pwrite_all(fd, data, 0)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def remove_tmp_files(directory: Path) -> int:
    """Delete temporaries left by a crash mid-write; returns how many."""
    count = 0
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
            entry.unlink()
            count += 1
    return count


class DirLock:
    """Exclusive ``flock`` on ``<data_dir>/lock`` holding the owner's pid.

    The kernel drops the lock when the process dies, so ``kill -9`` never
    leaves a stale lock; the pid written inside only serves the error message.
    """

    def __init__(self, data_dir: Path) -> None:
        path = data_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StoreLocked(str(data_dir), pid) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc}") from exc
        os.ftruncate(fd, 0)
        pwrite_all(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0)
        return int(raw.strip() or b"x")
    except (OSError, ValueError):
        return None
