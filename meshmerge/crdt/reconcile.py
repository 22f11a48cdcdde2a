"""Bucket-digest reconciliation: find which operations two replicas disagree on.

Theory of operation
-------------------
Roots tell two replicas *whether* their live sets differ, not *where*, and a
root covers only live ids while the state also holds dead adds, removals and
evidence. To repair one missing operation without shipping the whole state,
both sides split their operations by key into ``2**bits`` buckets and compare
a digest per bucket; the puller then asks only for the buckets that differ.

Every operation has a content id (a CIDv1 over sha2-256): adds their
contribution id, removals and evidence their ``key``. The bucket of an
operation is the top ``bits`` bits of that id's sha-256 digest, which is
uniform, so buckets hold ``n / 2**bits`` operations on average. A bucket's
digest is SHA-256 over its sorted ``kind byte ‖ id`` items, with its item
count beside it. Equal digests mean equal buckets (short of a SHA-256
collision); a bucket that differs in either direction is pulled whole, and
joining it is a set union, so pulling something already held is harmless.

The puller picks ``bits`` from its own size (about :data:`TARGET_PER_BUCKET`
operations per bucket, at most :data:`MAX_BITS`); one differing operation
then costs a digest list of ``2**bits`` entries plus one bucket, instead of
the whole state. Nothing here does I/O; the sync service carries the values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterator, Mapping
from typing import Final

from meshmerge.crdt.state import MergeState
from meshmerge.proto.cid import CID_LEN
from meshmerge.proto.messages import StateMessage

#: Most buckets a peer may ask for: 2**12 digests are ~160 KB on the wire.
MAX_BITS: Final = 12
#: Headers are kilobytes and a digest row ~40 bytes, so small buckets pay: at 8 per bucket a
#: repair in a 10,000-op set sends ~50 KB of digests and one ~40 KB bucket.
TARGET_PER_BUCKET: Final = 8
_DIGEST_AT: Final = CID_LEN - 32  # the sha-256 digest is the CID's last 32 bytes

#: bucket -> (digest of its items, item count); empty buckets are absent
Digests = dict[int, tuple[bytes, int]]


def choose_bits(ops: int) -> int:
    """Bucket bits for a state of ``ops`` operations (0 for a small state: one bucket)."""
    bits = 0
    while bits < MAX_BITS and (ops >> bits) > TARGET_PER_BUCKET:
        bits += 1
    return bits


def bucket_of(key: bytes, bits: int) -> int:
    """The top ``bits`` bits of the id's sha-256 digest."""
    if bits == 0:
        return 0
    return int.from_bytes(key[_DIGEST_AT : _DIGEST_AT + 2], "big") >> (16 - bits)


#: every operation key of a state, by kind byte: a copy, safe to hash on another thread
OpKeys = tuple[tuple[bytes, tuple[bytes, ...]], ...]


def op_keys(state: MergeState) -> OpKeys:
    """A snapshot of the state's operation keys (cheap: three C-level copies)."""
    o = state.orset
    return ((b"a", tuple(o.adds)), (b"r", tuple(o.removals)), (b"e", tuple(o.evidence)))


def _items(keys: OpKeys) -> Iterator[tuple[bytes, bytes]]:
    for kind, group in keys:
        for key in group:
            yield kind, key


def digests(state: MergeState, bits: int) -> Digests:
    """Digest and count of every non-empty bucket of ``state``'s operations."""
    return digests_of(op_keys(state), bits)


def digests_of(keys: OpKeys, bits: int) -> Digests:
    """:func:`digests` of a key snapshot (pure, so it can run off the event loop)."""
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in [0, {MAX_BITS}], got {bits}")
    buckets: dict[int, list[bytes]] = {}
    for kind, key in _items(keys):
        buckets.setdefault(bucket_of(key, bits), []).append(kind + key)
    out: Digests = {}
    for index, items in buckets.items():
        items.sort()
        out[index] = (hashlib.sha256(b"".join(items)).digest(), len(items))
    return out


def differing(mine: Mapping[int, tuple[bytes, int]], theirs: Mapping[int, tuple[bytes, int]]) -> list[int]:
    """Buckets the peer has that differ from ours (ours-only buckets are its job to pull)."""
    return sorted(i for i, value in theirs.items() if mine.get(i) != value)


def ops_in(state: MergeState, buckets: Collection[int], bits: int) -> StateMessage:
    """A delta with every operation of ``state`` in the given buckets."""
    wanted = set(buckets)
    o = state.orset

    def pick(keys: Collection[bytes]) -> list[bytes]:
        return sorted(k for k in keys if bucket_of(k, bits) in wanted)

    return StateMessage(
        state.set_id,
        tuple(o.adds[k] for k in pick(o.adds)),
        tuple(o.removals[k] for k in pick(o.removals)),
        tuple(o.evidence[k] for k in pick(o.evidence)),
    )


def op_count(state: MergeState) -> int:
    return sum(op_counts(state))


def op_counts(state: MergeState) -> tuple[int, int, int]:
    o = state.orset
    return len(o.adds), len(o.removals), len(o.evidence)


class DigestCache:
    """Bucket digests per (set, bits), recomputed only after the set has grown.

    Every peer's anti-entropy round asks for our digests, and hashing a
    10,000-operation state takes ~0.1 s. One OR-Set state only grows (adds,
    removals and evidence are never dropped), so for the *same* state object
    equal operation counts mean equal operations and a cached answer is still
    exact. A different state object for the set (left and rejoined, reloaded)
    never matches; ``forget`` drops a set's entries.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[bytes, int], tuple[MergeState, tuple[int, int, int], Digests]] = {}

    def get(self, state: MergeState, bits: int) -> Digests | None:
        entry = self._entries.get((state.set_id, bits))
        if entry is None or entry[0] is not state or entry[1] != op_counts(state):
            return None
        return entry[2]

    def put(self, state: MergeState, bits: int, counts: tuple[int, int, int], value: Digests) -> None:
        """Remember ``value``, computed from a snapshot taken when the counts were ``counts``."""
        self._entries[(state.set_id, bits)] = (state, counts, value)

    def forget(self, set_id: bytes) -> None:
        for key in [k for k in self._entries if k[0] == set_id]:
            del self._entries[key]
