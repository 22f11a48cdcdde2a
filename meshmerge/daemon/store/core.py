"""The Store: one node's durable state on disk.

Theory of operation
-------------------
Layout under ``data_dir`` (directories 0700, files 0600)::

    lock                              flock held while open; holds the owner's pid
    sets/<set id hex>/schema.cbor     the SetSchema; its CID is the directory name
    sets/<set id hex>/snapshot-<gen>  full state at generation <gen> (16 hex digits; none for gen 0)
    sets/<set id hex>/oplog-<gen>     operations appended since that snapshot
    sets/<set id hex>/seqs            this node's reserved author sequence numbers
    sets/<set id hex>/left            present once the node left the set (only schema + seqs remain)
    blobs/<shard>/<cid hex>.safetensors, blobs/.partial/, blobs/.tmp/, blobs/.damaged/

Record files use the framing of :mod:`.records` (keyed MAC per record).

**Acknowledgement.** ``append``, ``add_set``, ``put_blob``,
``BlobWriter.finish`` and ``next_seq`` return only after their bytes and the
directory entries that name them are fsynced. The daemon acknowledges
(to a trainer, or by forwarding) only after they return, so ``kill -9`` or
power loss at any instant loses nothing acknowledged.

**Generations.** The current generation of a set is the highest ``<gen>`` with
a snapshot file (0 if none); its state is ``snapshot-<gen>`` joined with every
record of ``oplog-<gen>``. ``snapshot`` moves from gen N to N+1 in this order:

1. create an empty ``oplog-<N+1>`` (fsynced);
2. write ``snapshot-<N+1>`` to a temporary name, fsync, rename, fsync the
   directory — this rename is the commit point;
3. delete ``snapshot-<N>`` and ``oplog-<N>``.

A crash before 2 leaves gen N intact (the stray ``oplog-<N+1>`` and temporary
are deleted on open); a crash after 2 leaves gen N+1 complete (the old files
are deleted on open). The snapshot holds the state it was given *plus* any
operation stored in generation N that the state lacks, so retiring the old
files can never drop an acknowledged operation even if the caller's state is
stale.

**Recovery on open.** Every current op log and sequence log is scanned. A
torn tail (bytes after the last valid record with no valid record after
them: the append a crash interrupted, never acknowledged) is truncated with a
WARNING naming the byte count. A damaged region *followed by valid records*
is different: those later records were acknowledged, so the scanner resyncs
on the next record whose keyed MAC verifies, keeps everything after it, and
reports the damage at ERROR (and in :attr:`Store.counters`). The damaged
bytes stay in the file until the next snapshot retires it; the operations
inside them are lost locally but, being signed CRDT operations, anti-entropy
fetches them again from peers. We resync rather than stop because stopping
would throw away every later acknowledged operation; a keyed MAC makes a
false resync practically impossible (peer-chosen bytes inside payloads
cannot pose as records). A damaged *final* record is indistinguishable from
a torn write and is treated as one.

**Leaving a set.** ``leave_set`` writes the ``left`` marker (fsynced: the
commit point), then deletes the snapshot and op log; a crash in between
finishes the deletion on open. The schema and ``seqs`` stay, so rejoining
(``add_set`` again) can never hand out a sequence number the node already
signed with, which peers would take for equivocation.

**Threads.** The daemon calls the store from worker threads
(``trio.to_thread``). Each set has its own lock (appends to different sets
proceed in parallel); the set registry has one more. Nothing here blocks on
anything but disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy.typing as npt

from meshmerge.crdt import MergeState
from meshmerge.daemon.store.atomic import (
    DIR_MODE,
    FILE_MODE,
    DirLock,
    fsync_dir,
    make_dirs,
    pwrite_all,
    remove_tmp_files,
    tmp_name,
)
from meshmerge.daemon.store.blobs import BlobStore, BlobUsage, BlobWriter, CollectionMark, CollectionReport
from meshmerge.daemon.store.errors import StoreError
from meshmerge.daemon.store.limits import StoreLimits
from meshmerge.daemon.store.logfile import RecordFile, read_records
from meshmerge.daemon.store.oplog import OpKeys, decode_payload, op_count, split_message
from meshmerge.daemon.store.records import Buffer, FileKind, Scan, scan
from meshmerge.daemon.store.seqs import SeqLog
from meshmerge.proto.cbor import CodecError, Limits
from meshmerge.proto.cid import cid_of
from meshmerge.proto.messages import ContributionHeader, SetSchema, StateMessage, loads_schema

log = logging.getLogger("meshmerge.store")

_SNAPSHOT = re.compile(r"snapshot-([0-9a-f]{16})")
_OPLOG = re.compile(r"oplog-([0-9a-f]{16})")
_SET_DIR = re.compile(r"[0-9a-f]{72}")
_TMP_DIR_SUFFIX = ".tmpdir"
_LEFT_MARK = "left"


@dataclass
class StoreCounters:
    """What recovery and replay found; exported as metrics by the daemon."""

    #: damaged regions skipped between valid records (ERROR: acknowledged data lost locally)
    corrupt_regions: int = 0
    corrupt_bytes: int = 0
    #: records whose MAC verified but whose payload is not a valid message (ERROR)
    undecodable_records: int = 0
    #: torn tails cut off on open (WARNING: an unacknowledged append was interrupted)
    torn_tails: int = 0
    torn_bytes: int = 0
    #: file header copies found damaged (the other copy was used)
    damaged_headers: int = 0
    #: published blobs that no longer parsed and were moved to blobs/.damaged
    damaged_blobs: int = 0
    #: logged operations MergeState refused on replay
    replay_rejected: int = 0
    snapshots: int = 0
    snapshot_carried_ops: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _gen_name(prefix: str, gen: int) -> str:
    return f"{prefix}-{gen:016x}"


class _Set:
    """Open files and bookkeeping of one merge set."""

    def __init__(self, directory: Path, schema: SetSchema, gen: int, oplog: RecordFile, seqs: SeqLog) -> None:
        self.dir = directory
        self.schema = schema
        self.gen = gen
        self.oplog = oplog
        self.seqs = seqs
        self.lock = threading.Lock()
        #: identities of every stored op (snapshot + op log); None until loaded or scanned
        self.keys: OpKeys | None = None
        #: damaged regions of the current op log / snapshot already reported (by start offset)
        self.reported_gaps: set[int] = set()
        self.reported_snapshot: set[int] = set()

    def close(self) -> None:
        self.oplog.close()
        self.seqs.close()


class Store:
    """Durable sets, op logs, snapshots, blobs and sequence numbers; see the module docstring."""

    def __init__(self, data_dir: Path, limits: StoreLimits, fsync: bool, lock: DirLock) -> None:
        self.data_dir = data_dir
        self.limits = limits
        self.fsync = fsync
        self._lock = lock
        self._registry = threading.Lock()
        self._sets: dict[bytes, _Set] = {}
        #: sets this node left (see "Leaving a set"): only their schema and seqs remain
        self._left: dict[bytes, SetSchema] = {}
        self._counters = StoreCounters()
        self._cbor_limits = Limits(max_message_bytes=limits.max_record_bytes)
        self._blobs: BlobStore | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, limits: StoreLimits = StoreLimits(), *, fsync: bool = True) -> Store:  # noqa: B008
        """Lock ``data_dir`` (creating it 0700) and recover it; see "Recovery on open"."""
        limits.validate()
        data_dir = Path(data_dir)
        make_dirs(data_dir, fsync=fsync)
        if data_dir.stat().st_mode & 0o077:
            log.warning("data directory %s is accessible to other users; chmod 700 it", data_dir)
        lock = DirLock(data_dir)
        store = cls(data_dir, limits, fsync, lock)
        try:
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def _recover(self) -> None:
        sets_dir = self.data_dir / "sets"
        make_dirs(sets_dir, fsync=self.fsync)
        self._blobs = BlobStore(self.data_dir / "blobs", self.limits, fsync=self.fsync)
        for entry in sorted(sets_dir.iterdir()):
            if entry.name.endswith(_TMP_DIR_SUFFIX):
                shutil.rmtree(entry)  # a set creation the crash interrupted: never acknowledged
                continue
            if not (entry.is_dir() and _SET_DIR.fullmatch(entry.name)):
                log.warning("ignoring unexpected entry %s in the store", entry)
                continue
            if (entry / _LEFT_MARK).exists():
                schema = self._read_schema(entry)
                self._drop_state_files(entry)  # a leave the crash interrupted
                self._left[schema.id] = schema
                continue
            handle = self._open_set(entry)
            self._sets[handle.schema.id] = handle

    @staticmethod
    def _read_schema(directory: Path) -> SetSchema:
        raw = (directory / "schema.cbor").read_bytes()
        if cid_of(raw).hex() != directory.name:
            raise StoreError(f"{directory}/schema.cbor does not hash to its directory name (damaged)")
        try:
            return loads_schema(raw)
        except CodecError as exc:
            raise StoreError(f"{directory}/schema.cbor: {exc}") from None

    def _drop_state_files(self, directory: Path) -> None:
        """Delete every snapshot and op log of a set directory (its schema and seqs stay)."""
        remove_tmp_files(directory)
        for p in list(directory.iterdir()):
            if _SNAPSHOT.fullmatch(p.name) or _OPLOG.fullmatch(p.name):
                p.unlink()
        if self.fsync:
            fsync_dir(directory)

    def _open_set(self, directory: Path) -> _Set:
        schema = self._read_schema(directory)
        remove_tmp_files(directory)
        gens = [int(m.group(1), 16) for p in directory.iterdir() if (m := _SNAPSHOT.fullmatch(p.name))]
        gen = max(gens, default=0)
        for p in list(directory.iterdir()):
            m = _SNAPSHOT.fullmatch(p.name) or _OPLOG.fullmatch(p.name)
            if m and int(m.group(1), 16) != gen:
                p.unlink()  # an older generation a snapshot retired, or a newer one it never committed
        log_path = directory / _gen_name("oplog", gen)
        if not log_path.exists():
            # Only possible if someone removed it: the snapshot alone is the state.
            log.error("%s is missing; starting an empty op log for generation %d", log_path, gen)
            RecordFile.create(
                log_path, FileKind.OPLOG, gen, max_len=self.limits.max_record_bytes, fsync=self.fsync
            ).close()
        oplog, found = RecordFile.open(
            log_path, FileKind.OPLOG, max_len=self.limits.max_record_bytes, fsync=self.fsync
        )
        seqs, seq_found = SeqLog.open(
            directory / "seqs", max_authors=self.limits.max_seq_authors, fsync=self.fsync
        )
        handle = _Set(directory, schema, gen, oplog, seqs)
        self._report(log_path, found, oplog.header.damaged_copies, handle.reported_gaps, repaired=True)
        self._report(directory / "seqs", seq_found, 0, set(), repaired=True)
        if seq_found.gaps:
            log.error(
                "%s: sequence reservations were damaged; pass at_least=<state's max seq + 1> to "
                "next_seq for this set's authors to be safe from reusing a seq",
                directory / "seqs",
            )
        return handle

    def _report(
        self, path: Path, found: Scan, damaged_headers: int, reported: set[int], *, repaired: bool = False
    ) -> None:
        """Log and count what a scan found. ``repaired``: the tail was cut off (open-time recovery)."""
        c = self._counters
        c.damaged_headers += damaged_headers
        if damaged_headers:
            log.error("%s: first header copy damaged; using the second", path)
        tail_key = -1 - found.end  # damaged tails share the "already reported" set with gaps
        if found.tail_bytes and not repaired and tail_key not in reported:
            # Not a crash: this file was complete (a committed snapshot, or a log verified on open).
            reported.add(tail_key)
            c.corrupt_regions += 1
            c.corrupt_bytes += found.tail_bytes
            log.error(
                "%s: the last %d byte(s) from offset %d are damaged; their operations are lost here "
                "(anti-entropy refetches them)",
                path,
                found.tail_bytes,
                found.end,
            )
        elif found.tail_bytes and repaired:
            c.torn_tails += 1
            c.torn_bytes += found.tail_bytes
            log.warning(
                "%s: dropped a torn tail of %d byte(s) after the last valid record at offset %d "
                "(an append interrupted by a crash; it was never acknowledged)",
                path,
                found.tail_bytes,
                found.end,
            )
        for gap in found.gaps:
            if gap.start in reported:
                continue
            reported.add(gap.start)
            c.corrupt_regions += 1
            c.corrupt_bytes += gap.end - gap.start
            log.error(
                "%s: %d damaged byte(s) at offsets [%d, %d) followed by valid records; skipped them and "
                "kept everything after (operations inside are lost here; anti-entropy refetches them)",
                path,
                gap.end - gap.start,
                gap.start,
                gap.end,
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._registry:
            for handle in self._sets.values():
                with handle.lock:
                    handle.close()
            self._sets.clear()
        self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def counters(self) -> StoreCounters:
        """A copy of what recovery and replay found so far."""
        c = StoreCounters(**self._counters.as_dict())
        if self._blobs is not None:
            c.damaged_blobs = self._blobs.damaged_count
        return c

    # -- sets --------------------------------------------------------------------

    def sets(self) -> list[SetSchema]:
        with self._registry:
            return [h.schema for _, h in sorted(self._sets.items())]

    def left_sets(self) -> list[SetSchema]:
        """Sets this node left; ``add_set`` rejoins one."""
        with self._registry:
            return [schema for _, schema in sorted(self._left.items())]

    def has_left(self, set_id: bytes) -> bool:
        with self._registry:
            return set_id in self._left

    def add_set(self, schema: SetSchema) -> None:
        """Durably create a merge set, or rejoin one this node left (idempotent otherwise)."""
        self._check_open()
        set_id = schema.id
        with self._registry:
            if set_id in self._sets:
                return
            if len(self._sets) >= self.limits.max_sets:
                raise StoreError(f"store holds {len(self._sets)} sets (StoreLimits.max_sets)")
            sets_dir = self.data_dir / "sets"
            if set_id in self._left:
                self._rejoin(sets_dir / set_id.hex())
                del self._left[set_id]
                return
            final = sets_dir / set_id.hex()
            tmp = sets_dir / f".{set_id.hex()}.{os.getpid()}{_TMP_DIR_SUFFIX}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                os.mkdir(tmp, DIR_MODE)
                self._write_file(tmp / "schema.cbor", schema.encoded)
                for name, kind in ((_gen_name("oplog", 0), FileKind.OPLOG), ("seqs", FileKind.SEQS)):
                    RecordFile.create(
                        tmp / name, kind, 0, max_len=self.limits.max_record_bytes, fsync=self.fsync
                    ).close()
                if self.fsync:
                    fsync_dir(tmp)
                os.rename(tmp, final)  # the commit point: a set directory is complete or absent
                if self.fsync:
                    fsync_dir(sets_dir)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StoreError(f"cannot create set {schema.name!r}: {exc}") from exc
            self._sets[set_id] = self._open_set(final)

    def _rejoin(self, directory: Path) -> None:
        """Start a left set again from an empty gen-0 op log; the seqs file carries over."""
        try:
            self._drop_state_files(directory)
            RecordFile.create(
                directory / _gen_name("oplog", 0),
                FileKind.OPLOG,
                0,
                max_len=self.limits.max_record_bytes,
                fsync=self.fsync,
            ).close()
            os.unlink(directory / _LEFT_MARK)  # the commit point
            if self.fsync:
                fsync_dir(directory)
        except OSError as exc:
            raise StoreError(f"cannot rejoin set in {directory}: {exc}") from exc
        handle = self._open_set(directory)
        self._sets[handle.schema.id] = handle

    def leave_set(self, set_id: bytes) -> None:
        """Stop keeping a set: delete its operations, keep its schema and seqs (see "Leaving a set").

        Blobs of its contributions become garbage for the next collection.
        """
        self._check_open()
        with self._registry:
            handle = self._sets.get(set_id)
            if handle is None:
                raise StoreError(f"unknown merge set {set_id.hex()[8:24]}…; nothing to leave")
            with handle.lock:
                try:
                    self._write_file(handle.dir / _LEFT_MARK, b"")
                    if self.fsync:
                        fsync_dir(handle.dir)
                except OSError as exc:
                    raise StoreError(f"cannot leave set {handle.schema.name!r}: {exc}") from exc
                handle.close()
                del self._sets[set_id]
                self._left[set_id] = handle.schema
                try:
                    self._drop_state_files(handle.dir)
                except OSError as exc:  # committed already; the next open finishes the job
                    log.warning("left set %s, but deleting its files failed: %s", handle.schema.name, exc)

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            pwrite_all(fd, data, 0)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _set(self, set_id: bytes) -> _Set:
        self._check_open()
        with self._registry:
            handle = self._sets.get(set_id)
        if handle is None:
            raise StoreError(f"unknown merge set {set_id.hex()[8:24]}…; add_set it first")
        return handle

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # -- state: load, append, snapshot -------------------------------------------

    def load_state(self, set_id: bytes) -> MergeState:
        """The set's state: its latest snapshot joined with every op logged since."""
        handle = self._set(set_id)
        with handle.lock:
            state = MergeState(handle.schema)
            keys = OpKeys()
            rejected = 0
            for msg in self._stored(handle):
                keys.add(msg)
                # Records are MAC-authenticated and were verified before they were written.
                rejected += len(state.apply(msg, trusted=True).rejected)
            handle.keys = keys
            if rejected:
                self._counters.replay_rejected += rejected
                log.warning("set %s: replay refused %d stored operation(s)", handle.schema.name, rejected)
            return state

    def _stored(self, handle: _Set) -> Iterator[StateMessage]:
        """Every stored message of the set: the snapshot's records, then the op log's."""
        set_id = handle.schema.id
        if handle.gen > 0:
            path = handle.dir / _gen_name("snapshot", handle.gen)
            with read_records(path, FileKind.SNAPSHOT, self.limits.max_record_bytes) as (header, buf, found):
                self._report(path, found, header.damaged_copies, handle.reported_snapshot)
                yield from self._messages(path, buf, found, set_id)
        with handle.oplog.mapped() as buf:
            found = _rescan(buf, handle.oplog)
            self._report(handle.oplog.path, found, 0, handle.reported_gaps)
            yield from self._messages(handle.oplog.path, buf, found, set_id)

    def _messages(self, path: Path, buf: Buffer, found: Scan, set_id: bytes) -> Iterator[StateMessage]:
        """Decode records one at a time (memory stays bounded by one record's message)."""
        for rec in found.records:
            msg = decode_payload(bytes(buf[rec.payload_start : rec.end]), set_id, self._cbor_limits)
            if isinstance(msg, str):
                self._counters.undecodable_records += 1
                log.error(
                    "%s: record at offset %d verifies but cannot be replayed: %s", path, rec.offset, msg
                )
                continue
            yield msg

    def append(self, set_id: bytes, ops: StateMessage) -> None:
        """Durably log operations the set's state accepted (e.g. ``ApplyReport.new_ops``).

        Returns only after the records are fsynced: acknowledge after this.
        """
        if ops.set_id != set_id:
            raise StoreError("message belongs to another merge set than the one it is appended to")
        handle = self._set(set_id)
        if not op_count(ops):
            return
        payloads = split_message(ops, self.limits)
        with handle.lock:
            handle.oplog.append(payloads)
            if handle.keys is not None:
                handle.keys.add(ops)

    def oplog_bytes(self, set_id: bytes) -> int:
        return self._set(set_id).oplog.size

    def snapshot_due(self, set_id: bytes) -> bool:
        return self.oplog_bytes(set_id) > self.limits.max_oplog_bytes_before_snapshot

    def maybe_snapshot(self, set_id: bytes, state: MergeState | StateMessage) -> bool:
        """Snapshot when the op log exceeds ``max_oplog_bytes_before_snapshot``; True if it did."""
        if not self.snapshot_due(set_id):
            return False
        self.snapshot(set_id, state)
        return True

    def snapshot(self, set_id: bytes, state: MergeState | StateMessage) -> None:
        """Atomically replace the set's snapshot + op log by one snapshot of ``state``.

        ``state`` is a MergeState or its ``full_state()`` (take that in the
        thread that owns the state if other tasks may mutate it meanwhile).
        Stored operations (previous snapshot or op log) missing from it are
        kept in the new snapshot, so this never loses an appended operation
        even when given a stale state. The store remembers the identities of
        all stored operations once the set was loaded (about 100 bytes per
        operation); otherwise it reads them back first.
        """
        full = state.full_state() if isinstance(state, MergeState) else state
        if full.set_id != set_id:
            raise StoreError("state belongs to another merge set than the one snapshotted")
        handle = self._set(set_id)
        with handle.lock:
            if handle.oplog.failed is not None:
                raise StoreError(f"{handle.oplog.path}: an earlier write failed; reopen the store")
            keys = handle.keys if handle.keys is not None else self._scan_keys(handle)
            extra = self._carry(handle, keys.missing_from(full))
            body = StateMessage(set_id, full.adds, full.removals, full.evidence)
            written = OpKeys()
            written.add(body)
            payloads = split_message(body, self.limits) if op_count(body) else []
            if extra is not None:
                payloads += split_message(extra, self.limits)
                written.add(extra)
            self._switch_generation(handle, payloads)
            handle.keys = written
            self._counters.snapshots += 1

    def _switch_generation(self, handle: _Set, payloads: list[bytes]) -> None:
        old_gen, new_gen = handle.gen, handle.gen + 1
        max_len = self.limits.max_record_bytes
        new_log = RecordFile.create(
            handle.dir / _gen_name("oplog", new_gen),
            FileKind.OPLOG,
            new_gen,
            max_len=max_len,
            fsync=self.fsync,
        )
        snap_path = handle.dir / _gen_name("snapshot", new_gen)
        tmp = tmp_name(snap_path)
        try:
            snap = RecordFile.create(tmp, FileKind.SNAPSHOT, new_gen, max_len=max_len, fsync=False)
            try:
                snap.append(payloads)
                if self.fsync:
                    os.fsync(snap._require_fd())
            finally:
                snap.close()
            os.replace(tmp, snap_path)  # the commit point
            if self.fsync:
                fsync_dir(handle.dir)
        except BaseException:
            new_log.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.unlink(new_log.path)
            raise
        old_log = handle.oplog
        handle.oplog, handle.gen = new_log, new_gen
        handle.reported_gaps, handle.reported_snapshot = set(), set()
        old_log.close()
        for name in (_gen_name("oplog", old_gen), _gen_name("snapshot", old_gen)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle.dir / name)
        if self.fsync:
            fsync_dir(handle.dir)

    def _scan_keys(self, handle: _Set) -> OpKeys:
        keys = OpKeys()
        for msg in self._stored(handle):
            keys.add(msg)
        return keys

    def _carry(self, handle: _Set, missing: OpKeys) -> StateMessage | None:
        """Stored operations the snapshotted state lacks, minus any replay would refuse."""
        if not len(missing):
            return None
        check = MergeState(handle.schema)
        adds, removals, evidence = [], [], []
        for msg in self._stored(handle):
            sel = missing.select(msg)
            adds += [a for a in sel.adds if check.check_header(a) is None]
            removals += [r for r in sel.removals if check.check_removal(r) is None]
            evidence += [e for e in sel.evidence if check.check_evidence(e) is None]
        carried = StateMessage(handle.schema.id, tuple(adds), tuple(removals), tuple(evidence))
        n = op_count(carried)
        self._counters.snapshot_carried_ops += n
        log.warning(
            "snapshot of set %s: the given state lacks %d stored operation(s); keeping %d valid one(s) in it",
            handle.schema.name,
            len(missing),
            n,
        )
        return carried if n else None

    # -- sequence numbers --------------------------------------------------------------

    def next_seq(self, set_id: bytes, author: bytes, *, at_least: int = 0) -> int:
        """Durably reserve and return ``author``'s next sequence number in this set.

        The reservation is fsynced before this returns, so no crash can make
        the node hand out the same seq twice (which would be equivocation).
        ``at_least`` lets the daemon also respect seqs it learns of elsewhere
        (e.g. ``state.orset.max_seq(author) + 1`` after restoring from peers).
        """
        handle = self._set(set_id)
        with handle.lock:
            return handle.seqs.next(author, at_least)

    # -- blobs ---------------------------------------------------------------------------

    @property
    def _blob_store(self) -> BlobStore:
        self._check_open()
        assert self._blobs is not None
        return self._blobs

    def put_blob(self, header: ContributionHeader, data: bytes | memoryview) -> None:
        """Verify ``data`` against the header's manifest, then publish it durably (BlobRejected if it does not match)."""
        self._blob_store.put(header, data)

    def blob_writer(self, header: ContributionHeader) -> BlobWriter:
        """A resumable chunked writer for the header's blob (see :class:`BlobWriter`)."""
        return self._blob_store.writer(header)

    def has_blob(self, cid: bytes) -> bool:
        return self._blob_store.has(cid)

    def blob_path(self, cid: bytes) -> Path:
        return self._blob_store.path(cid)

    def get_tensors(self, cid: bytes) -> dict[str, npt.NDArray[Any]] | None:
        """Zero-copy read-only views of a stored blob's tensors (verified when stored), or None."""
        return self._blob_store.get_tensors(cid)

    def blob_usage(self) -> BlobUsage:
        """Published blob count and bytes, bytes reserved by writes in progress, and the quota."""
        return self._blob_store.usage()

    def begin_blob_collection(self) -> CollectionMark:
        """Start a garbage collection: call *before* computing the ids to keep (see blobs.py)."""
        return self._blob_store.begin_collection()

    def collect_blobs(self, keep: Collection[bytes], mark: CollectionMark) -> CollectionReport:
        """Delete blobs and idle partial writes not in ``keep`` (e.g. the live ids of every set).

        Blobs published since ``mark`` are spared, so a blob stored while the
        caller computed ``keep`` is never lost.
        """
        report = self._blob_store.collect(keep, mark)
        if report.blobs_removed or report.parts_removed:
            log.info(
                "blob collection: removed %d blob(s) (%d bytes) and %d partial write(s) (%d bytes); kept %d",
                report.blobs_removed,
                report.bytes_freed,
                report.parts_removed,
                report.part_bytes_freed,
                report.blobs_kept,
            )
        return report

    def collect_garbage(self, keep: Collection[bytes] | None = None) -> CollectionReport:
        """One-call collection for single-threaded users: keep ``keep``, or every set's live ids."""
        mark = self.begin_blob_collection()
        if keep is None:
            keep = {cid for schema in self.sets() for cid in self.load_state(schema.id).live_ids()}
        return self.collect_blobs(keep, mark)


def _rescan(buf: Buffer, file: RecordFile) -> Scan:
    return scan(buf, file.header.salt, file.max_len)
