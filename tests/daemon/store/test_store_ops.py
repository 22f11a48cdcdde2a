"""Store: sets, op log, snapshots, recovery, sequence numbers."""

from __future__ import annotations

import logging
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshmerge.crdt import MergeState
from meshmerge.daemon.store import Store, StoreError, StoreLimits, StoreLocked
from meshmerge.daemon.store.limits import MIN_RECORD_BYTES
from meshmerge.daemon.store.logfile import RecordFile, read_records
from meshmerge.daemon.store.records import FILE_HEADER_LEN, FileKind
from meshmerge.proto.messages import StateMessage
from tests.crdt.factories import schema, signer
from tests.crdt.pool import POOL, observable
from tests.daemon.store.helpers import live_state, open_store

SCHEMA = schema()
SID = SCHEMA.id


def set_dir(root: Path) -> Path:
    return root / "sets" / SID.hex()


def filled(root: Path, **limits: int) -> tuple[Store, MergeState]:
    """A store with every pool operation appended one by one, and the matching live state."""
    store = open_store(root, **limits)
    store.add_set(SCHEMA)
    live = MergeState(SCHEMA)
    for op in POOL.ops():
        report = live.apply(op)
        if report.new_ops is not None:
            store.append(SID, report.new_ops)
    return store, live


def total_ops(state: MergeState) -> int:
    return len(state.orset.adds) + len(state.orset.removals) + len(state.orset.evidence)


def records_in(path: Path, kind: FileKind = FileKind.OPLOG) -> int:
    with read_records(path, kind, MIN_RECORD_BYTES) as (_, _, found):
        return len(found.records)


# -- open, lock, limits ------------------------------------------------------------


def test_open_creates_private_dirs_and_locks(tmp_path: Path) -> None:
    root = tmp_path / "a" / "data"
    with open_store(root) as store:
        for d in (root, root / "sets", root / "blobs", root.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert (root / "lock").read_text().strip() == str(os.getpid())
        with pytest.raises(StoreLocked, match=f"locked by pid {os.getpid()}") as info:
            Store.open(root)
        assert info.value.pid == os.getpid()
        assert store.sets() == []
    with open_store(root):
        pass


def test_limits_validate_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"StoreLimits\.max_sets must be a positive integer"):
        StoreLimits(max_sets=0).validate()
    with pytest.raises(ValueError, match=r"StoreLimits\.max_record_bytes must be at least"):
        StoreLimits(max_record_bytes=1000).validate()
    with pytest.raises(ValueError, match=r"StoreLimits\.max_record_bytes must fit the u32"):
        StoreLimits(max_record_bytes=2**33).validate()
    with pytest.raises(ValueError, match=r"max_blob_writers"):
        StoreLimits(max_blob_writers=True).validate()  # type: ignore[arg-type]
    assert StoreLimits().validate() == StoreLimits()


def test_open_refuses_invalid_limits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_sets"):
        Store.open(tmp_path, StoreLimits(max_sets=-1))


def test_closed_store_refuses_work(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.add_set(SCHEMA)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load_state(SID)
    with pytest.raises(StoreError, match="closed"):
        store.has_blob(POOL.adds[0].id)


# -- sets ------------------------------------------------------------------------------


def test_add_set_is_durable_and_idempotent(tmp_path: Path) -> None:
    with open_store(tmp_path, max_sets=1) as store:
        store.add_set(SCHEMA)
        store.add_set(SCHEMA)
        assert store.sets() == [SCHEMA]
        with pytest.raises(StoreError, match="max_sets"):
            store.add_set(schema("other/set"))
    with open_store(tmp_path) as store:
        assert [s.id for s in store.sets()] == [SID]
        assert store.load_state(SID).live_ids() == []


def test_interrupted_set_creation_is_discarded(tmp_path: Path) -> None:
    with open_store(tmp_path):
        pass
    leftover = tmp_path / "sets" / f".{SID.hex()}.123.tmpdir"
    leftover.mkdir()
    (leftover / "schema.cbor").write_bytes(b"partial")
    with open_store(tmp_path) as store:
        assert store.sets() == []
    assert not leftover.exists()


def test_damaged_schema_file_is_reported(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
    path = set_dir(tmp_path) / "schema.cbor"
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    with pytest.raises(StoreError, match="does not hash to its directory name"):
        open_store(tmp_path)


def test_unknown_set(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        for call in (
            lambda: store.load_state(SID),
            lambda: store.append(SID, StateMessage(SID, adds=POOL.adds[:1])),
            lambda: store.next_seq(SID, b"a" * 38),
            lambda: store.snapshot(SID, MergeState(SCHEMA)),
        ):
            with pytest.raises(StoreError, match="unknown merge set"):
                call()


# -- op log and snapshots --------------------------------------------------------------


def test_replay_equals_the_live_state(tmp_path: Path) -> None:
    store, live = filled(tmp_path)
    assert observable(store.load_state(SID)) == observable(live)
    store.close()
    with open_store(tmp_path) as store:
        replayed = store.load_state(SID)
        assert replayed.root() == live.root()
        assert observable(replayed) == observable(live)
        assert store.counters.replay_rejected == 0


def test_append_checks_the_set_and_ignores_empty_messages(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        other = schema("other/set")
        with pytest.raises(StoreError, match="another merge set"):
            store.append(SID, StateMessage(other.id))
        before = store.oplog_bytes(SID)
        store.append(SID, StateMessage(SID))
        assert store.oplog_bytes(SID) == before


def test_snapshot_then_replay_equals_the_live_state(tmp_path: Path) -> None:
    store, live = filled(tmp_path)
    store.snapshot(SID, live)
    assert sorted(p.name for p in set_dir(tmp_path).iterdir()) == [
        "oplog-0000000000000001",
        "schema.cbor",
        "seqs",
        "snapshot-0000000000000001",
    ]
    assert records_in(set_dir(tmp_path) / "oplog-0000000000000001") == 0
    assert observable(store.load_state(SID)) == observable(live)
    # ops after the snapshot land in the new log; a second snapshot moves on again
    extra = MergeState(SCHEMA).contribute(signer(7), POOL.blobs[POOL.adds[0].id], seq=0)
    live.apply(StateMessage(SID, adds=(extra,)))
    store.append(SID, StateMessage(SID, adds=(extra,)))
    store.close()
    with open_store(tmp_path) as store:
        assert store.load_state(SID).root() == live.root()
        store.snapshot(SID, live.full_state())
        assert (set_dir(tmp_path) / "snapshot-0000000000000002").exists()
        assert not (set_dir(tmp_path) / "snapshot-0000000000000001").exists()
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live)
        assert store.counters.snapshots == 0


@pytest.mark.parametrize("reopen", [False, True], ids=["keys-tracked", "keys-scanned"])
def test_snapshot_of_a_stale_state_keeps_logged_ops(
    tmp_path: Path, reopen: bool, caplog: pytest.LogCaptureFixture
) -> None:
    store, live = filled(tmp_path)
    if reopen:
        store.close()
        store = open_store(tmp_path)
    with caplog.at_level(logging.WARNING, "meshmerge.store"):
        store.snapshot(SID, MergeState(SCHEMA))
    assert "lacks" in caplog.text
    assert store.counters.snapshot_carried_ops > 0
    store.close()
    with open_store(tmp_path) as store:
        # even a state older than the previous snapshot loses nothing (keys read back from disk)
        store.snapshot(SID, MergeState(SCHEMA))
        assert observable(store.load_state(SID)) == observable(live)
        store.snapshot(SID, MergeState(SCHEMA))  # keys tracked since the load
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live)


def test_snapshot_checks_the_set(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        with pytest.raises(StoreError, match="another merge set"):
            store.snapshot(SID, MergeState(schema("other/set")))


def test_crash_before_the_snapshot_commit_keeps_the_old_generation(tmp_path: Path) -> None:
    store, live = filled(tmp_path)
    store.close()
    d = set_dir(tmp_path)
    RecordFile.create(
        d / "oplog-0000000000000001", FileKind.OPLOG, 1, max_len=MIN_RECORD_BYTES, fsync=False
    ).close()
    (d / ".snapshot-0000000000000001.abc.tmp").write_bytes(b"half a snapshot")
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live)
    assert sorted(p.name for p in d.iterdir()) == ["oplog-0000000000000000", "schema.cbor", "seqs"]


def test_crash_after_the_snapshot_commit_finishes_the_switch(tmp_path: Path) -> None:
    store, live = filled(tmp_path)
    d = set_dir(tmp_path)
    old_log = (d / "oplog-0000000000000000").read_bytes()
    store.snapshot(SID, live)
    store.close()
    (d / "oplog-0000000000000000").write_bytes(old_log)  # as if the crash came before the unlink
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live)
    assert not (d / "oplog-0000000000000000").exists()


def test_big_messages_are_split_into_several_records(tmp_path: Path) -> None:
    store, live = filled(tmp_path, max_ops_per_record=2)
    before = records_in(set_dir(tmp_path) / "oplog-0000000000000000")
    store.append(SID, live.full_state())
    after = records_in(set_dir(tmp_path) / "oplog-0000000000000000")
    total = len(POOL.adds) + len(POOL.removals) + len(POOL.evidence)
    assert after - before == (total + 1) // 2
    store.snapshot(SID, live)
    assert records_in(set_dir(tmp_path) / "snapshot-0000000000000001", FileKind.SNAPSHOT) >= total // 2
    store.close()
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live)


def test_maybe_snapshot_waits_for_the_limit(tmp_path: Path) -> None:
    with open_store(tmp_path, max_oplog_bytes_before_snapshot=4000) as store:
        store.add_set(SCHEMA)
        live = MergeState(SCHEMA)
        snapshots = 0
        for op in POOL.ops():
            new = live.apply(op).new_ops
            if new is not None:
                store.append(SID, new)
            due = store.oplog_bytes(SID) > 4000
            assert store.maybe_snapshot(SID, live) is due
            snapshots += due
        assert snapshots >= 2
        assert observable(store.load_state(SID)) == observable(live)


# -- recovery --------------------------------------------------------------------------


def test_torn_tail_at_every_offset_of_the_last_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    origin = tmp_path / "origin"
    store, live = filled(origin)
    log_path = set_dir(origin) / "oplog-0000000000000000"
    before_last = log_path.stat().st_size
    expected = observable(store.load_state(SID))
    last = live.remove(signer(0), POOL.adds[1].id)  # a small record: one removal
    store.append(SID, StateMessage(SID, removals=(last,)))
    store.close()
    full = log_path.read_bytes()
    assert len(full) - before_last < 400
    work_log = set_dir(origin) / "oplog-0000000000000000"
    for cut in range(before_last, len(full)):
        work_log.write_bytes(full[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, "meshmerge.store"), open_store(origin) as store:
            assert observable(store.load_state(SID)) == expected, cut
            counters = store.counters
            torn = cut - before_last
            assert (counters.torn_tails, counters.torn_bytes) == ((1, torn) if torn else (0, 0))
            assert counters.corrupt_regions == 0
            if torn:
                assert f"dropped a torn tail of {torn} byte(s)" in caplog.text
            assert work_log.stat().st_size == before_last
            if cut % 8:
                continue
            store.append(SID, StateMessage(SID, removals=(last,)))  # appends continue cleanly
        with open_store(origin) as store:
            assert observable(store.load_state(SID)) == observable(live)
            assert store.counters.torn_tails == 0


def test_flipped_bit_in_a_middle_record_is_loud_and_keeps_later_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        sizes = [store.oplog_bytes(SID)]
        for add in POOL.adds[:3]:
            store.append(SID, StateMessage(SID, adds=(add,)))
            sizes.append(store.oplog_bytes(SID))
    path = set_dir(tmp_path) / "oplog-0000000000000000"
    raw = bytearray(path.read_bytes())
    raw[(sizes[1] + sizes[2]) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, "meshmerge.store"), open_store(tmp_path) as store:
        assert "damaged byte(s)" in caplog.text and any(r.levelno == logging.ERROR for r in caplog.records)
        counters = store.counters
        assert (counters.corrupt_regions, counters.corrupt_bytes) == (1, sizes[2] - sizes[1])
        assert counters.torn_tails == 0
        state = store.load_state(SID)
        assert set(state.orset.adds) == {POOL.adds[0].id, POOL.adds[2].id}
        assert store.counters.corrupt_regions == 1  # reported once, not again on replay
        assert path.stat().st_size == sizes[3]  # nothing truncated
        store.append(SID, StateMessage(SID, adds=POOL.adds[1:2]))  # e.g. refetched by anti-entropy
        store.snapshot(SID, store.load_state(SID))
    with open_store(tmp_path) as store:
        assert store.counters.corrupt_regions == 0  # the damaged log was retired by the snapshot
        assert set(store.load_state(SID).orset.adds) == {a.id for a in POOL.adds[:3]}


def test_undecodable_record_is_reported_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        store.append(SID, StateMessage(SID, adds=POOL.adds[:1]))
    path = set_dir(tmp_path) / "oplog-0000000000000000"
    file, _ = RecordFile.open(path, FileKind.OPLOG, max_len=MIN_RECORD_BYTES, fsync=False)
    file.append([b"\xa1\x61x\x01", b"not cbor at all"])
    file.close()
    with caplog.at_level(logging.ERROR, "meshmerge.store"), open_store(tmp_path) as store:
        store.append(SID, StateMessage(SID, adds=POOL.adds[1:2]))
        assert set(store.load_state(SID).orset.adds) == {a.id for a in POOL.adds[:2]}
        assert store.counters.undecodable_records == 2
        assert "cannot be replayed" in caplog.text


def test_damaged_first_header_copy_is_survived(tmp_path: Path) -> None:
    store, live = filled(tmp_path)
    store.close()
    path = set_dir(tmp_path) / "oplog-0000000000000000"
    raw = bytearray(path.read_bytes())
    raw[12] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_store(tmp_path) as store:
        assert store.counters.damaged_headers == 1
        assert observable(store.load_state(SID)) == observable(live)
    raw[56 + 12] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="header unreadable"):
        open_store(tmp_path)


def test_failed_fsync_cuts_back_and_refuses_further_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store.open(tmp_path, fsync=True)
    store.add_set(SCHEMA)
    store.append(SID, StateMessage(SID, adds=POOL.adds[:1]))
    size = store.oplog_bytes(SID)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(StoreError, match="write failed"):
        store.append(SID, StateMessage(SID, adds=POOL.adds[1:2]))
    monkeypatch.undo()
    assert (set_dir(tmp_path) / "oplog-0000000000000000").stat().st_size == size
    with pytest.raises(StoreError, match="reopen the store"):
        store.append(SID, StateMessage(SID, adds=POOL.adds[1:2]))
    with pytest.raises(StoreError, match="reopen the store"):
        store.snapshot(SID, MergeState(SCHEMA))
    store.close()
    with Store.open(tmp_path) as store:
        assert set(store.load_state(SID).orset.adds) == {POOL.adds[0].id}


# -- sequence numbers --------------------------------------------------------------------


def test_next_seq_is_durable_monotonic_and_per_author(tmp_path: Path) -> None:
    a, b = signer(0).peer_id, signer(1).peer_id
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        assert [store.next_seq(SID, a) for _ in range(3)] == [0, 1, 2]
        assert store.next_seq(SID, b) == 0
        assert store.next_seq(SID, a, at_least=10) == 10
        assert store.next_seq(SID, a, at_least=5) == 11
    with open_store(tmp_path) as store:
        assert store.next_seq(SID, a) == 12
        assert store.next_seq(SID, b) == 1


def test_next_seq_limits(tmp_path: Path) -> None:
    with open_store(tmp_path, max_seq_authors=2) as store:
        store.add_set(SCHEMA)
        store.next_seq(SID, b"a")
        store.next_seq(SID, b"b")
        with pytest.raises(StoreError, match="max_seq_authors"):
            store.next_seq(SID, b"c")
        with pytest.raises(StoreError, match="author must be"):
            store.next_seq(SID, b"")
        with pytest.raises(StoreError, match="exhausted"):
            store.next_seq(SID, b"a", at_least=2**64)


def test_seq_log_is_compacted_on_open(tmp_path: Path) -> None:
    a = signer(0).peer_id
    with open_store(tmp_path) as store:
        store.add_set(SCHEMA)
        for _ in range(400):
            store.next_seq(SID, a)
    path = set_dir(tmp_path) / "seqs"
    assert records_in(path, FileKind.SEQS) == 400
    with open_store(tmp_path) as store:
        assert records_in(path, FileKind.SEQS) == 1
        assert store.next_seq(SID, a) == 400
    with open_store(tmp_path) as store:
        assert store.next_seq(SID, a) == 401


@pytest.mark.parametrize("where", ["middle", "last"])
def test_damaged_snapshot_record_is_loud_and_keeps_the_rest(
    tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A committed snapshot is never torn, so damage anywhere in it, even at its end, is an ERROR."""
    store, live = filled(tmp_path, max_ops_per_record=4)
    store.snapshot(SID, live)
    store.close()
    path = set_dir(tmp_path) / "snapshot-0000000000000001"
    with read_records(path, FileKind.SNAPSHOT, MIN_RECORD_BYTES) as (_, _, found):
        records = list(found.records)
    assert len(records) >= 3
    target = records[len(records) // 2] if where == "middle" else records[-1]
    raw = bytearray(path.read_bytes())
    raw[target.payload_start + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, "meshmerge.store"), open_store(tmp_path) as store:
        state = store.load_state(SID)
        assert store.counters.corrupt_regions == 1 and store.counters.torn_tails == 0
        assert "damaged" in caplog.text
        lost = total_ops(live) - total_ops(state)
        assert 1 <= lost <= 4  # exactly the damaged record's operations (at most max_ops_per_record)
    assert path.stat().st_size == len(raw)  # a snapshot is never truncated


def test_threads_appending_while_another_snapshots_lose_nothing(tmp_path: Path) -> None:
    """Worker threads append while another snapshots a stale copy of the state: the
    per-set lock orders them and the snapshot keeps whatever its state lacked."""
    ops = POOL.ops()
    store = open_store(tmp_path)
    store.add_set(SCHEMA)
    errors: list[BaseException] = []
    stale = MergeState(SCHEMA)

    def appender(part: list[StateMessage]) -> None:
        try:
            for op in part:
                store.append(SID, op)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def snapshotter() -> None:
        try:
            for _ in range(10):
                store.snapshot(SID, stale.full_state())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(ops[i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=snapshotter))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.close()
    with open_store(tmp_path) as store:
        assert observable(store.load_state(SID)) == observable(live_state())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
    st.integers(0, 10**6),
    st.sampled_from(["oplog-0000000000000000", "seqs"]),
)
def test_random_damage_never_breaks_open_or_replay(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]], cut: int, name: str
) -> None:
    """Any damage after the file headers: the store opens, replays a subset of what was
    stored (nothing invented), and counts what it skipped."""
    root = tmp_path_factory.mktemp("damage")
    store, live = filled(root)
    store.next_seq(SID, b"author")
    store.close()
    path = set_dir(root) / name
    raw = bytearray(path.read_bytes())
    body = len(raw) - FILE_HEADER_LEN
    for pos, mask in flips:
        raw[FILE_HEADER_LEN + pos % body] ^= mask
    path.write_bytes(bytes(raw[: FILE_HEADER_LEN + cut % (body + 1)]))
    with open_store(root) as store:
        state = store.load_state(SID)
        assert set(state.orset.adds) <= set(live.orset.adds)
        assert set(state.orset.removals) <= set(live.orset.removals)
        assert set(state.orset.evidence) <= set(live.orset.evidence)
        if name == "seqs" and not flips and cut % (body + 1) == body:
            assert store.next_seq(SID, b"author") == 1
        else:
            store.next_seq(SID, b"author")


# -- leaving a set ---------------------------------------------------------------------


def test_leaving_deletes_the_operations_and_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store, _ = filled(root)
    store.leave_set(SID)
    assert store.sets() == [] and [s.id for s in store.left_sets()] == [SID]
    names = sorted(p.name for p in set_dir(root).iterdir())
    assert names == ["left", "schema.cbor", "seqs"], "operations are gone, schema and seqs stay"
    with pytest.raises(StoreError, match="unknown merge set"):
        store.append(SID, StateMessage(SID))
    with pytest.raises(StoreError, match="nothing to leave"):
        store.leave_set(SID)
    store.close()
    with open_store(root) as again:
        assert again.sets() == [] and [s.id for s in again.left_sets()] == [SID]


def test_rejoining_starts_empty_and_never_reuses_a_seq(tmp_path: Path) -> None:
    root = tmp_path / "data"
    author = signer(1).peer_id
    with open_store(root) as store:
        store.add_set(SCHEMA)
        used = [store.next_seq(SID, author) for _ in range(3)]
        store.append(SID, POOL.ops()[0])
        store.leave_set(SID)
    with open_store(root) as store:
        store.add_set(SCHEMA)  # rejoin
        assert store.left_sets() == [] and [s.id for s in store.sets()] == [SID]
        assert total_ops(store.load_state(SID)) == 0
        assert store.next_seq(SID, author) > max(used)
        assert not (set_dir(root) / "left").exists()


def test_a_leave_interrupted_after_its_commit_point_is_finished_on_open(tmp_path: Path) -> None:
    root = tmp_path / "data"
    store, _ = filled(root)
    store.close()
    (set_dir(root) / "left").write_bytes(b"")  # the marker is durable, the files not yet deleted
    with open_store(root) as again:
        assert again.sets() == [] and [s.id for s in again.left_sets()] == [SID]
    assert sorted(p.name for p in set_dir(root).iterdir()) == ["left", "schema.cbor", "seqs"]
