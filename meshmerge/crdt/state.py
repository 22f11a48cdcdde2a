"""MergeState: one merge set's replicated state and its merged model.

This is the gate between untrusted messages and the OR-Set. Every operation
is checked here — signature, merge-set schema, limits — and a bad operation
is rejected on its own with a reason (the network layer turns reasons into
score penalties) without losing anything already accepted. Ids are always
recomputed from canonical bytes, never taken from the sender.

The merged model is ``strategy(live contributions in canonical order,
params, seed = Merkle root)``. The strategy and its default parameters and
the base model are part of the schema (whose hash is the set id), and the
seed is the root, so two replicas with the same live set compute the same
bytes; local opinions (scores, reputation) never enter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.crdt import strategies
from meshmerge.crdt.orset import Changes, ORSet
from meshmerge.crdt.signing import DOMAIN_HEADER, DOMAIN_REMOVAL, Signer, verify
from meshmerge.crdt.strategies.base import MergeInput
from meshmerge.crdt.tensors import STORAGE_DTYPES, TensorSpec, little_endian
from meshmerge.proto.messages import (
    ContributionHeader,
    Equivocation,
    Removal,
    SetSchema,
    SignedHeader,
    StateMessage,
    TensorEntry,
)

Tensors = Mapping[str, npt.NDArray[Any]]
TensorLookup = Callable[[bytes], Tensors | None]


class MergeStateError(ValueError):
    """A local request (contribute, remove, merge) cannot be done; says why."""


class SchemaMismatch(MergeStateError):
    pass


class TensorMismatch(MergeStateError):
    pass


class Incomplete(MergeStateError):
    """Some live contributions' tensors are not here yet."""

    def __init__(self, missing: list[bytes]) -> None:
        super().__init__(f"tensors of {len(missing)} live contribution(s) not available yet")
        self.missing = missing


@dataclass
class ApplyReport:
    """Outcome of applying a message: what changed and what was refused, and why."""

    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    convicted: list[bytes] = field(default_factory=list)
    duplicates: int = 0
    ignored: int = 0
    rejected: list[str] = field(default_factory=list)
    new_ops: StateMessage | None = None

    def absorb(self, changes: Changes) -> None:
        self.added += changes.added
        self.removed += changes.removed
        self.convicted += changes.convicted
        self.duplicates += changes.duplicate


def manifest_of(tensors: Tensors, dtypes: Mapping[str, str]) -> tuple[TensorEntry, ...]:
    """Manifest entries (sorted by name) with sha-256 of each tensor's raw little-endian bytes."""
    entries = []
    for name in sorted(tensors):
        array = little_endian(tensors[name])
        entries.append(
            TensorEntry(
                name, dtypes[name], tuple(array.shape), array.nbytes, hashlib.sha256(array.data).digest()
            )
        )
    return tuple(entries)


def verify_tensors(header: ContributionHeader, tensors: Tensors) -> None:
    """Raise TensorMismatch unless `tensors` are exactly the header's manifest."""
    verify_manifest(header.tensors, tensors)


def verify_manifest(manifest: tuple[TensorEntry, ...], tensors: Tensors) -> None:
    if sorted(tensors) != [t.name for t in manifest]:
        raise TensorMismatch(f"tensor names {sorted(tensors)[:5]}… do not match the manifest")
    for entry in manifest:
        array = np.ascontiguousarray(tensors[entry.name])
        if array.dtype != STORAGE_DTYPES[entry.dtype] or tuple(array.shape) != entry.shape:
            raise TensorMismatch(
                f"tensor {entry.name!r}: {array.dtype}{list(array.shape)} is not the manifest's"
            )
        if hashlib.sha256(little_endian(array).data).digest() != entry.sha256:
            raise TensorMismatch(f"tensor {entry.name!r}: sha-256 of its bytes does not match the manifest")


class MergeState:
    def __init__(self, schema: SetSchema) -> None:
        self.schema = schema
        self.set_id = schema.id
        self.orset = ORSet()
        self._specs = [TensorSpec(t.name, t.dtype, t.shape) for t in schema.tensors]

    # -- local operations ----------------------------------------------------

    def contribute(self, signer: Signer, tensors: Tensors, **kw: Any) -> SignedHeader:
        """Sign a contribution and add it here; returns the signed header to announce."""
        signed = self.make_contribution(signer, tensors, **kw)
        self.orset.add(signed)
        return signed

    def make_contribution(
        self,
        signer: Signer,
        tensors: Tensors,
        *,
        weight: int = 1,
        dtypes: Mapping[str, str] | None = None,
        meta: Mapping[str, Any] | None = None,
        seq: int | None = None,
    ) -> SignedHeader:
        """Build and sign a contribution without changing the state.

        ``seq`` defaults to one past the author's highest seq known here. The
        caller (the daemon) must persist the counter: reusing a seq with other
        content is equivocation and convicts the author.
        """
        dtypes = dtypes or {t.name: t.dtype for t in self.schema.tensors}
        if seq is None:
            last = self.orset.max_seq(signer.peer_id)
            seq = 0 if last is None else last + 1
        header = ContributionHeader(
            set_id=self.set_id,
            author=signer.peer_id,
            seq=seq,
            weight=weight,
            kind=self.schema.kind,
            tensors=manifest_of(tensors, dtypes),
            base=self.schema.base.name if self.schema.base else None,
            meta=dict(meta or {}),
        )
        self.check_schema(header)
        return SignedHeader(header, signer.sign(DOMAIN_HEADER, header.encoded))

    def remove(self, signer: Signer, cid: bytes) -> Removal:
        """Retract one of the signer's own contributions here; returns the removal to announce."""
        removal = self.make_removal(signer, cid)
        self.orset.remove(removal)
        return removal

    def make_removal(self, signer: Signer, cid: bytes) -> Removal:
        """Sign a removal of the dots observed here for `cid`, without changing the state."""
        signed = self.orset.adds.get(cid)
        if signed is None:
            raise MergeStateError(f"unknown contribution {cid.hex()[:16]}…")
        if signed.header.author != signer.peer_id:
            raise MergeStateError("only the author of a contribution can remove it")
        unsigned = Removal(cid, signer.peer_id, (signed.header.dot,))
        removal = Removal(
            cid, signer.peer_id, unsigned.dots, signer.sign(DOMAIN_REMOVAL, unsigned.encoded_unsigned)
        )
        self.orset.remove(removal)
        return removal

    # -- remote operations ---------------------------------------------------

    def apply(self, message: StateMessage, *, trusted: bool = False) -> ApplyReport:
        """Join a delta or full state; each operation is checked on its own.

        ``trusted=True`` skips the signature checks and nothing else. It is for
        replaying this node's own store, whose records are authenticated (a
        keyed MAC) and held only operations that passed these checks before
        they were written; never for anything that came from a peer.
        """
        report = ApplyReport()
        if message.set_id != self.set_id:
            report.rejected.append("message is for another merge set")
            return report
        new_adds, new_removals, new_evidence = [], [], []
        for proof in message.evidence:
            if self._reject(report, self.check_evidence(proof, trusted)):
                continue
            if self.orset.is_convicted(proof.author):
                report.ignored += proof.key not in self.orset.evidence
                report.duplicates += proof.key in self.orset.evidence
                continue
            changes = self.orset.add_evidence(proof)
            report.absorb(changes)
            if not changes.duplicate:
                new_evidence.append(proof)
        for signed in message.adds:
            if self.orset.is_convicted(signed.header.author):
                report.ignored += 1
                continue
            if signed.id in self.orset.adds:
                report.duplicates += 1
                continue
            if self._reject(report, self.check_header(signed, trusted)):
                continue
            changes = self.orset.add(signed)
            report.absorb(changes)
            new_adds.append(signed)
            new_evidence += changes.evidence
        for removal in message.removals:
            if removal.key in self.orset.removals:
                report.duplicates += 1
                continue
            if self._reject(report, self.check_removal(removal, trusted)):
                continue
            report.absorb(self.orset.remove(removal))
            new_removals.append(removal)
        if new_adds or new_removals or new_evidence:
            report.new_ops = StateMessage(
                self.set_id, tuple(new_adds), tuple(new_removals), tuple(new_evidence)
            )
        return report

    @staticmethod
    def _reject(report: ApplyReport, reason: str | None) -> bool:
        if reason is not None:
            report.rejected.append(reason)
        return reason is not None

    def check_header(self, signed: SignedHeader, trusted: bool = False) -> str | None:
        header = signed.header
        if not trusted and not verify(header.author, DOMAIN_HEADER, header.encoded, signed.signature):
            return f"contribution {signed.id.hex()[:16]}…: bad signature"
        try:
            self.check_schema(header)
        except SchemaMismatch as exc:
            return f"contribution {signed.id.hex()[:16]}…: {exc}"
        return None

    def check_schema(self, header: ContributionHeader) -> None:
        schema = self.schema
        if header.set_id != self.set_id:
            raise SchemaMismatch("belongs to another merge set")
        if header.kind != schema.kind:
            raise SchemaMismatch(f"kind {header.kind!r} but the set takes {schema.kind!r}")
        expected_base = schema.base.name if schema.base else None
        if header.base != expected_base:
            raise SchemaMismatch(f"base {header.base!r} but the set's base is {expected_base!r}")
        want = {t.name: t for t in schema.tensors}
        got = {t.name: t for t in header.tensors}
        if want.keys() != got.keys():
            missing = sorted(want.keys() - got.keys())[:3]
            extra = sorted(got.keys() - want.keys())[:3]
            raise SchemaMismatch(
                f"tensor names differ from the schema (missing {missing}, unexpected {extra})"
            )
        for name, spec in want.items():
            entry = got[name]
            if (entry.dtype, entry.shape) != (spec.dtype, spec.shape):
                got_desc, want_desc = f"{entry.dtype}{list(entry.shape)}", f"{spec.dtype}{list(spec.shape)}"
                raise SchemaMismatch(f"tensor {name!r} is {got_desc}, schema says {want_desc}")

    def check_removal(self, removal: Removal, trusted: bool = False) -> str | None:
        if any(replica != removal.author for replica, _ in removal.dots):
            return "removal names dots of another author"
        if not trusted and not verify(
            removal.author, DOMAIN_REMOVAL, removal.encoded_unsigned, removal.signature
        ):
            return "removal: bad signature"
        return None

    def check_evidence(self, proof: Equivocation, trusted: bool = False) -> str | None:
        for signed in (proof.first, proof.second):
            if signed.header.set_id != self.set_id:
                return "evidence about another merge set"
            header = signed.header
            if not trusted and not verify(header.author, DOMAIN_HEADER, header.encoded, signed.signature):
                return "evidence: bad signature on a header"
        return None

    # -- queries ---------------------------------------------------------------

    def live_ids(self) -> list[bytes]:
        return list(self.orset.live_ids())

    def root(self) -> bytes:
        return self.orset.root()

    def header(self, cid: bytes) -> ContributionHeader:
        return self.orset.adds[cid].header

    def full_state(self) -> StateMessage:
        o = self.orset
        return StateMessage(
            self.set_id,
            tuple(o.adds[k] for k in sorted(o.adds)),
            tuple(o.removals[k] for k in sorted(o.removals)),
            tuple(o.evidence[k] for k in sorted(o.evidence)),
            schema=self.schema,
            full=True,
        )

    def merged(
        self,
        tensors_of: TensorLookup,
        strategy: str | None = None,
        params: Mapping[str, Any] | None = None,
        base: Tensors | None = None,
    ) -> dict[str, Any]:
        """Merge the live set. Tensors come from `tensors_of(id)` (already verified).

        Strategy and params default to the schema's. Raises Incomplete when
        some live contribution's tensors are missing.
        """
        ids = self.orset.live_ids()
        found = [tensors_of(cid) for cid in ids]
        missing = [cid for cid, t in zip(ids, found, strict=True) if t is None]
        if missing:
            raise Incomplete(missing)
        if (base is None) != (self.schema.base is None):
            raise MergeStateError("base tensors are needed exactly when the schema names a base model")
        if base is not None and self.schema.base is not None:
            verify_manifest(self.schema.base.tensors, base)
        name = strategy or self.schema.strategy
        chosen_params = self.schema.params if params is None and strategy is None else params
        inp = MergeInput(
            tensors=[t for t in found if t is not None],
            weights=[float(self.orset.adds[cid].header.weight) for cid in ids],
            kind=self.schema.kind,
            specs=self._specs,
            seed=self.root(),
            base=base,
        )
        return strategies.get(name).run(inp, chosen_params)


def digest_of_tensors(tensors: Mapping[str, npt.NDArray[Any]]) -> str:
    """sha-256 over (name, raw bytes) of every tensor in name order: the merged-model digest."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        h.update(name.encode() + b"\x00" + str(array.dtype).encode() + str(array.shape).encode())
        h.update(little_endian(array).data)
    return h.hexdigest()
