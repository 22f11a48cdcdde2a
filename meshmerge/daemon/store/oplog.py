"""Op-log payloads: StateMessages as records, and which operations a log holds.

A record's payload is the canonical CBOR of one :class:`StateMessage`
(:func:`meshmerge.proto.messages.dumps`). A message too big for one record
(more than ``max_record_bytes`` or ``max_ops_per_record``) is split into
several; operations are independent CRDT updates, so a crash between the
records of one split append loses only unacknowledged operations.

:class:`OpKeys` remembers the identity of every stored operation of a set
(snapshot and op log), so :meth:`Store.snapshot` can prove that the state it
is given contains all of them before it retires the old files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshmerge.daemon.store.errors import StoreError
from meshmerge.daemon.store.limits import StoreLimits
from meshmerge.proto.cbor import CodecError, Limits, encode
from meshmerge.proto.messages import Equivocation, Removal, SignedHeader, StateMessage, dumps, loads_state

#: Bytes left in each record for the message envelope (keys, set id, array heads).
_ENVELOPE = 512


def op_count(msg: StateMessage) -> int:
    return len(msg.adds) + len(msg.removals) + len(msg.evidence)


def split_message(msg: StateMessage, limits: StoreLimits) -> list[bytes]:
    """Payloads for ``msg``: one if it fits, else its operations in bounded chunks (no schema)."""
    whole = dumps(msg)
    if len(whole) <= limits.max_record_bytes and op_count(msg) <= limits.max_ops_per_record:
        return [whole]
    budget = limits.max_record_bytes - _ENVELOPE
    payloads: list[bytes] = []
    chunk: dict[str, list[SignedHeader | Removal | Equivocation]] = {"a": [], "r": [], "e": []}
    size = count = 0

    def flush() -> None:
        nonlocal size, count
        if count:
            part = StateMessage(msg.set_id, tuple(chunk["a"]), tuple(chunk["r"]), tuple(chunk["e"]))  # type: ignore[arg-type]
            payloads.append(dumps(part))
            for ops in chunk.values():
                ops.clear()
            size = count = 0

    kinds: list[tuple[str, tuple[SignedHeader | Removal | Equivocation, ...]]] = [
        ("a", msg.adds),
        ("r", msg.removals),
        ("e", msg.evidence),
    ]
    for kind, ops in kinds:
        for op in ops:
            n = len(encode(op.to_obj()))
            if n > budget:
                raise StoreError(
                    f"one operation encodes to {n} bytes, over StoreLimits.max_record_bytes "
                    f"({limits.max_record_bytes}) minus the envelope"
                )
            if size + n > budget or count >= limits.max_ops_per_record:
                flush()
            chunk[kind].append(op)
            size += n
            count += 1
    flush()
    return payloads


def decode_payload(payload: bytes, set_id: bytes, limits: Limits) -> StateMessage | str:
    """The message in a verified record, or a reason it cannot be one."""
    try:
        msg = loads_state(payload, limits)
    except CodecError as exc:
        return f"not a state message: {exc}"
    if msg.set_id != set_id:
        return "message belongs to another merge set"
    return msg


@dataclass
class OpKeys:
    """Identities of a set of operations (adds map id -> author)."""

    adds: dict[bytes, bytes] = field(default_factory=dict)
    removals: set[bytes] = field(default_factory=set)
    evidence: set[bytes] = field(default_factory=set)

    def add(self, msg: StateMessage) -> None:
        for a in msg.adds:
            self.adds[a.id] = a.header.author
        self.removals.update(r.key for r in msg.removals)
        self.evidence.update(e.key for e in msg.evidence)

    def missing_from(self, full: StateMessage) -> OpKeys:
        """Operations here that ``full`` lacks (adds of authors it convicts do not count:
        replaying them would be ignored anyway)."""
        convicted = {e.author for e in full.evidence}
        have_adds = {a.id for a in full.adds}
        have_removals = {r.key for r in full.removals}
        have_evidence = {e.key for e in full.evidence}
        return OpKeys(
            {k: a for k, a in self.adds.items() if k not in have_adds and a not in convicted},
            self.removals - have_removals,
            self.evidence - have_evidence,
        )

    def __len__(self) -> int:
        return len(self.adds) + len(self.removals) + len(self.evidence)

    def select(self, msg: StateMessage) -> StateMessage:
        """The operations of ``msg`` whose identity is in this set."""
        return StateMessage(
            msg.set_id,
            tuple(a for a in msg.adds if a.id in self.adds),
            tuple(r for r in msg.removals if r.key in self.removals),
            tuple(e for e in msg.evidence if e.key in self.evidence),
        )
