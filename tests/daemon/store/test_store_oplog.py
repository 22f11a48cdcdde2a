"""Op-log payloads: splitting messages into records, decoding them, tracking their keys."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.daemon.store import StoreLimits
from meshmerge.daemon.store.oplog import OpKeys, decode_payload, op_count, split_message
from meshmerge.proto.cbor import Limits
from meshmerge.proto.messages import StateMessage, dumps
from tests.crdt.factories import schema, signer
from tests.crdt.pool import EQUIVOCATOR, POOL

SID = schema().id
LIMITS = Limits(max_message_bytes=1 << 20)
FULL = StateMessage(SID, POOL.adds, POOL.removals, POOL.evidence)


def ids(msg: StateMessage) -> tuple[list[bytes], list[bytes], list[bytes]]:
    return [a.id for a in msg.adds], [r.key for r in msg.removals], [e.key for e in msg.evidence]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_decoding_arbitrary_bytes_never_raises(data: bytes) -> None:
    assert isinstance(decode_payload(data, SID, LIMITS), str)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 255), st.integers(0, 10**6))
def test_decoding_mutated_messages_never_raises(pos: int, mask: int, cut: int) -> None:
    raw = bytearray(dumps(FULL))
    raw[pos % len(raw)] ^= mask
    result = decode_payload(bytes(raw[: len(raw) - cut % 64]), SID, LIMITS)
    assert isinstance(result, (str, StateMessage))


def test_decoding_checks_the_set() -> None:
    assert (
        decode_payload(dumps(FULL), schema("other/set").id, LIMITS) == "message belongs to another merge set"
    )
    assert ids(decode_payload(dumps(FULL), SID, LIMITS)) == ids(FULL)  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.data())
def test_split_keeps_every_op_in_order(per_record: int, data: st.DataObject) -> None:
    adds = data.draw(st.lists(st.sampled_from(POOL.adds), max_size=12))
    removals = data.draw(st.lists(st.sampled_from(POOL.removals), max_size=5))
    msg = StateMessage(SID, tuple(adds), tuple(removals), POOL.evidence)
    limits = StoreLimits(max_ops_per_record=per_record)
    payloads = split_message(msg, limits)
    parts = [decode_payload(p, SID, LIMITS) for p in payloads]
    assert all(isinstance(p, StateMessage) and op_count(p) <= per_record for p in parts)
    joined = [ids(p) for p in parts]  # type: ignore[arg-type]
    assert [x for a, _, _ in joined for x in a] == ids(msg)[0]
    assert [x for _, r, _ in joined for x in r] == ids(msg)[1]
    assert [x for _, _, e in joined for x in e] == ids(msg)[2]


def test_missing_ops_ignore_adds_of_convicted_authors() -> None:
    keys = OpKeys()
    keys.add(FULL)
    assert len(keys) == op_count(FULL)
    assert not len(keys.missing_from(FULL))
    only_evidence = StateMessage(SID, evidence=POOL.evidence)
    missing = keys.missing_from(only_evidence)
    convicted = signer(EQUIVOCATOR).peer_id
    assert missing.adds and convicted not in missing.adds.values()
    assert set(missing.adds) == {a.id for a in POOL.adds if a.header.author != convicted}
    assert missing.removals == {r.key for r in POOL.removals} and not missing.evidence
    assert ids(missing.select(FULL))[0] == [a.id for a in POOL.adds if a.header.author != convicted]
