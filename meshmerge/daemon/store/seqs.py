"""Durable reservation of this node's author sequence numbers.

A contribution's dot is ``(author, seq)``; signing two different headers with
the same dot is equivocation, and any peer holding both convicts the author.
So a seq must never be handed out twice, even across crashes: ``next`` appends
a ``{"a": author, "s": seq}`` record and fsyncs it *before* returning the
number. A crash after the reservation but before the contribution is signed
only leaves a gap in the author's seqs, which is harmless.

The log keeps one record per reservation and is compacted on open (rewritten
atomically with one record per author) once it holds many more records than
authors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from meshmerge.daemon.store.atomic import fsync_dir, tmp_name
from meshmerge.daemon.store.errors import StoreError
from meshmerge.daemon.store.logfile import RecordFile
from meshmerge.daemon.store.records import FileKind, Scan
from meshmerge.proto.cbor import CodecError, Limits, decode, encode

log = logging.getLogger("meshmerge.store")

MAX_AUTHOR_LEN = 64
MAX_SEQ = 2**64 - 1
_RECORD_LIMITS = Limits(max_message_bytes=256, max_depth=2, max_items=8)
_COMPACT_SLACK = 256


class SeqLog:
    def __init__(self, file: RecordFile, last: dict[bytes, int], max_authors: int) -> None:
        self._file = file
        self._last = last
        self._max_authors = max_authors

    @classmethod
    def open(cls, path: Path, *, max_authors: int, fsync: bool) -> tuple[SeqLog, Scan]:
        file, found = RecordFile.open(path, FileKind.SEQS, max_len=1024, fsync=fsync)
        last: dict[bytes, int] = {}
        bad = 0
        with file.mapped() as buf:
            for rec in found.records:
                parsed = _parse(bytes(buf[rec.payload_start : rec.end]))
                if parsed is None:
                    bad += 1
                    continue
                author, seq = parsed
                last[author] = max(seq, last.get(author, -1))
        if bad:
            log.error("%s: %d sequence record(s) have a valid checksum but unreadable content", path, bad)
        seqs = cls(file, last, max_authors)
        if len(found.records) > 4 * len(last) + _COMPACT_SLACK:
            seqs._compact(fsync)
        return seqs, found

    def last(self, author: bytes) -> int | None:
        return self._last.get(author)

    def next(self, author: bytes, at_least: int = 0) -> int:
        """Reserve and return the author's next seq (>= at_least), durably."""
        if not isinstance(author, bytes) or not 0 < len(author) <= MAX_AUTHOR_LEN:
            raise StoreError(f"author must be 1..{MAX_AUTHOR_LEN} bytes")
        if author not in self._last and len(self._last) >= self._max_authors:
            raise StoreError(
                f"this set already tracks {len(self._last)} local authors (StoreLimits.max_seq_authors)"
            )
        prev = self._last.get(author)
        seq = max(at_least, 0 if prev is None else prev + 1)
        if seq > MAX_SEQ:
            raise StoreError(f"author's sequence numbers are exhausted (> {MAX_SEQ})")
        self._file.append([encode({"a": author, "s": seq})])
        self._last[author] = seq
        return seq

    def _compact(self, fsync: bool) -> None:
        path = self._file.path
        tmp = tmp_name(path)
        fresh = RecordFile.create(tmp, FileKind.SEQS, 0, max_len=1024, fsync=False)
        try:
            fresh.append([encode({"a": a, "s": s}) for a, s in sorted(self._last.items())])
            if fsync:
                os.fsync(fresh._require_fd())
        except BaseException:
            fresh.close()
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
        self._file.close()
        fresh.path = path
        self._file = fresh

    def close(self) -> None:
        self._file.close()


def _parse(payload: bytes) -> tuple[bytes, int] | None:
    try:
        obj: Any = decode(payload, _RECORD_LIMITS)
    except CodecError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"a", "s"}:
        return None
    author, seq = obj["a"], obj["s"]
    if not isinstance(author, bytes) or not 0 < len(author) <= MAX_AUTHOR_LEN:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        return None
    return author, seq
