"""A fixed pool of signed operations to build random states from (signing is slow,
so hypothesis draws subsets of these instead of signing per example)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshmerge.crdt import MergeState
from meshmerge.proto.messages import Equivocation, Removal, SignedHeader, StateMessage
from tests.crdt.factories import schema, signer, tensors

AUTHORS = 4
SEQS = 3
EQUIVOCATOR = 3


@dataclass(frozen=True)
class Pool:
    adds: tuple[SignedHeader, ...]
    removals: tuple[Removal, ...]
    evidence: tuple[Equivocation, ...]
    blobs: dict[bytes, dict[str, np.ndarray]]

    def ops(self) -> list[StateMessage]:
        """Every operation as its own one-op delta."""
        set_id = self.adds[0].header.set_id
        return (
            [StateMessage(set_id, adds=(a,)) for a in self.adds]
            + [StateMessage(set_id, removals=(r,)) for r in self.removals]
            + [StateMessage(set_id, evidence=(e,)) for e in self.evidence]
        )


def build_pool() -> Pool:
    adds, removals, blobs = [], [], {}
    for k in range(AUTHORS):
        scratch = MergeState(schema())
        for seq in range(SEQS):
            t = tensors(100 * k + seq)
            h = scratch.contribute(signer(k), t, weight=1 + (k + seq) % 3, seq=seq)
            adds.append(h)
            blobs[h.id] = t
        removals.append(scratch.remove(signer(k), adds[-SEQS].id))
    twin_scratch = MergeState(schema())
    t = tensors(999)
    twin = twin_scratch.contribute(signer(EQUIVOCATOR), t, seq=1)
    adds.append(twin)
    blobs[twin.id] = t
    original = next(a for a in adds if a.header.dot == twin.header.dot and a.id != twin.id)
    return Pool(tuple(adds), tuple(removals), (Equivocation.of(original, twin),), blobs)


POOL = build_pool()


def observable(s: MergeState) -> tuple[object, ...]:
    """What must converge: live set, root, convictions, and the honest authors' operations."""
    convicted = s.orset.convicted()
    honest_adds = sorted(k for k, a in s.orset.adds.items() if a.header.author not in convicted)
    return (tuple(s.live_ids()), s.root(), convicted, tuple(honest_adds), tuple(sorted(s.orset.removals)))
