"""The record codec: framing, MAC, resync, torn tails, and robustness to arbitrary bytes."""

from __future__ import annotations

import hmac
import os
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.daemon.store import CorruptRecord
from meshmerge.daemon.store.records import (
    FILE_HEADER_LEN,
    HEADER_COPY_LEN,
    RECORD_MARK,
    RECORD_PREFIX_LEN,
    FileKind,
    encode_file_header,
    encode_record,
    parse_file_header,
    record_at,
    scan,
)

SALT = bytes(range(16))
MAX = 1 << 16


def build(payloads: list[bytes], salt: bytes = SALT) -> tuple[bytes, list[int]]:
    """A file image and the offset of each record."""
    out = bytearray(encode_file_header(FileKind.OPLOG, 7, salt))
    offsets = []
    for p in payloads:
        offsets.append(len(out))
        out += encode_record(salt, p, MAX)
    return bytes(out), offsets


def payloads_of(buf: bytes, salt: bytes = SALT) -> list[bytes]:
    return [buf[r.payload_start : r.end] for r in scan(buf, salt, MAX).records]


def test_round_trip_and_header() -> None:
    data = [b"", b"a", b"hello" * 100, os.urandom(3000)]
    buf, _ = build(data)
    header = parse_file_header(buf, FileKind.OPLOG)
    assert (header.kind, header.gen, header.salt, header.damaged_copies) == (FileKind.OPLOG, 7, SALT, 0)
    found = scan(buf, SALT, MAX)
    assert payloads_of(buf) == data
    assert found.end == found.size == len(buf) and not found.gaps


def test_header_second_copy_survives_damage_to_the_first() -> None:
    buf = bytearray(build([b"x"])[0])
    buf[3] ^= 0x40
    assert parse_file_header(buf, FileKind.OPLOG).damaged_copies == 1
    buf[HEADER_COPY_LEN + 20] ^= 1
    with pytest.raises(CorruptRecord, match="header unreadable"):
        parse_file_header(buf, FileKind.OPLOG)


def test_header_kind_and_version_are_checked() -> None:
    buf = build([])[0]
    with pytest.raises(CorruptRecord, match="expected 2"):
        parse_file_header(buf, FileKind.SNAPSHOT)
    with pytest.raises(CorruptRecord, match="too short"):
        parse_file_header(buf[:10], FileKind.OPLOG)


def test_record_over_the_limit_is_refused_when_encoding_and_reading() -> None:
    with pytest.raises(CorruptRecord, match="exceeds"):
        encode_record(SALT, b"x" * 11, 10)
    buf, offsets = build([b"x" * 100])
    assert record_at(buf, offsets[0], SALT, 99) is None
    assert record_at(buf, offsets[0], SALT, 100) is not None


def test_wrong_salt_verifies_nothing() -> None:
    buf, _ = build([b"a", b"b"])
    assert scan(buf, bytes(16), MAX).records == []


def test_record_inside_a_payload_is_not_taken_for_a_record() -> None:
    """A peer may put record-shaped bytes in a payload, but cannot know the file's salt."""
    forged = encode_record(os.urandom(16), b"evil", MAX)
    buf, offsets = build([b"A" * 50 + forged + b"B" * 50, b"next"])
    damaged = bytearray(buf)
    damaged[offsets[0] + 2] ^= 0xFF  # break the outer record's mark
    found = scan(bytes(damaged), SALT, MAX)
    assert [bytes(damaged[r.payload_start : r.end]) for r in found.records] == [b"next"]
    assert found.gaps[0].start == offsets[0] and found.gaps[0].end == offsets[1]


def test_torn_tail_at_every_byte_of_the_last_record() -> None:
    data = [b"first", b"second" * 20, b"last record payload" * 5]
    buf, offsets = build(data)
    for cut in range(offsets[-1], len(buf)):
        found = scan(buf[:cut], SALT, MAX)
        assert payloads_of(buf[:cut]) == data[:-1], cut
        assert found.end == offsets[-1] and found.tail_bytes == cut - offsets[-1] and not found.gaps


def test_every_flipped_bit_in_a_middle_record_loses_only_that_record() -> None:
    data = [b"one" * 10, b"two" * 10, b"three" * 10]
    buf, offsets = build(data)
    for pos in range(offsets[1], offsets[2]):
        for bit in (0, 7):
            damaged = bytearray(buf)
            damaged[pos] ^= 1 << bit
            found = scan(bytes(damaged), SALT, MAX)
            assert payloads_of(bytes(damaged)) == [data[0], data[2]], (pos, bit)
            assert len(found.gaps) == 1 and found.gaps[0].start == offsets[1]
            assert found.end == len(buf)


def test_flipped_bit_in_the_last_record_is_a_torn_tail() -> None:
    data = [b"one", b"two"]
    buf, offsets = build(data)
    damaged = bytearray(buf)
    damaged[-1] ^= 1
    found = scan(bytes(damaged), SALT, MAX)
    assert payloads_of(bytes(damaged)) == [b"one"] and found.end == offsets[1] and not found.gaps


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.integers(0, 200))
def test_arbitrary_bytes_never_raise(data: bytes, start: int) -> None:
    found = scan(data, SALT, MAX, start=start)
    assert 0 <= found.end <= max(len(data), start)
    assert all(start <= r.offset < r.end <= len(data) for r in found.records)
    with pytest.raises(CorruptRecord):
        parse_file_header(data, FileKind.OPLOG)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=300), min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    st.integers(0, 10**6),
)
def test_mutated_files_yield_only_original_records_in_order(
    data: list[bytes], flips: list[tuple[int, int]], cut: int
) -> None:
    """Whatever is damaged or cut, every record the scanner returns is one we wrote, in order,
    and every record whose bytes were untouched is returned (no silent loss)."""
    buf, offsets = build(data)
    ends = [*offsets[1:], len(buf)]
    damaged = bytearray(buf)
    touched = set()
    for pos, mask in flips:
        pos = FILE_HEADER_LEN + pos % (len(buf) - FILE_HEADER_LEN)
        damaged[pos] ^= mask or 1
        touched.add(pos)
    cut = FILE_HEADER_LEN + cut % (len(buf) - FILE_HEADER_LEN + 1)
    image = bytes(damaged[:cut])
    records = scan(image, SALT, MAX).records
    index = {off: i for i, off in enumerate(offsets)}
    assert all(r.offset in index for r in records)
    assert [image[r.payload_start : r.end] for r in records] == [data[index[r.offset]] for r in records]
    intact = [
        i
        for i, (a, b) in enumerate(zip(offsets, ends, strict=True))
        if b <= cut and not touched & set(range(a, b))
    ]
    assert set(intact) <= {index[r.offset] for r in records}


def test_scan_memory_and_time_are_bounded_on_hostile_input() -> None:
    """Marks everywhere with huge declared lengths: nothing is allocated for them."""
    hostile = (RECORD_MARK + (2**32 - 1).to_bytes(4, "little") + bytes(16)) * 20_000
    assert len(hostile) == 20_000 * RECORD_PREFIX_LEN
    tracemalloc.start()
    found = scan(hostile, SALT, MAX, start=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert found.records == [] and found.end == 0
    assert peak < 1 << 20


def test_record_mac_is_truncated_hmac_sha256() -> None:
    """Pins the documented format: anyone can verify our files with a standard HMAC."""
    payload = os.urandom(777)
    record = encode_record(SALT, payload, MAX)
    expected = hmac.digest(SALT, len(payload).to_bytes(4, "little") + payload, "sha256")[:16]
    assert record[:4] == RECORD_MARK and record[4:8] == (777).to_bytes(4, "little")
    assert record[8:24] == expected and record[24:] == payload
