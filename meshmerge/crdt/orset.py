"""The OR-Set of contributions: all the rules of the replicated set live here.

Theory of operation
-------------------
State is three grow-only sets, so join is set union and is commutative,
associative and idempotent by construction:

* **adds** – signed contribution headers, keyed by contribution id. Each add
  carries a unique dot ``(author peer id, author seq)``; the dot is inside
  the signed header, so nobody can forge or reuse another author's dot.
* **removals** – author-signed removals naming a target id and the dots the
  author observed for it. A removal kills exactly those (id, dot) pairs, so a
  later add with a fresh dot survives (add wins over a concurrent remove).
* **evidence** – proofs of misbehaviour (two different headers with the same
  dot). Evidence convicts the author: none of its contributions are live.

``live = {id in adds : (id, dot) not removed and author not convicted}``.

This module trusts what it is given: signatures, schema and limits are
checked by :mod:`meshmerge.crdt.state` before anything reaches it. Every
operation costs O(log n) plus the work on the entries it touches; nothing is
re-sorted per operation, and the Merkle root is brought up to date lazily when
asked for, rehashing only the subtrees a change touched
(:class:`~meshmerge.crdt.merkle.MerkleTree`).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from meshmerge.crdt.merkle import MerkleTree
from meshmerge.proto.messages import Equivocation, Removal, SignedHeader

Dot = tuple[bytes, int]


@dataclass
class Changes:
    """What one operation changed; drives gossip deltas and reporting."""

    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    convicted: list[bytes] = field(default_factory=list)
    evidence: list[Equivocation] = field(default_factory=list)
    duplicate: bool = False


class ORSet:
    __slots__ = (
        "_by_author",
        "_by_dot",
        "_convicted",
        "_live",
        "_tombstones",
        "_tree",
        "adds",
        "evidence",
        "removals",
    )

    def __init__(self) -> None:
        self.adds: dict[bytes, SignedHeader] = {}
        self.removals: dict[bytes, Removal] = {}
        self.evidence: dict[bytes, Equivocation] = {}
        self._by_dot: dict[Dot, list[bytes]] = {}
        self._by_author: dict[bytes, list[bytes]] = {}
        self._tombstones: set[tuple[bytes, Dot]] = set()
        self._convicted: dict[bytes, bytes] = {}  # author -> key of the evidence that convicted it
        self._live: list[bytes] = []
        self._tree = MerkleTree()  # over _live, position for position

    # -- queries -----------------------------------------------------------

    def live_ids(self) -> list[bytes]:
        """Live contribution ids in canonical (sorted) order. Do not mutate."""
        return self._live

    def is_live(self, cid: bytes) -> bool:
        i = bisect_left(self._live, cid)
        return i < len(self._live) and self._live[i] == cid

    def is_convicted(self, author: bytes) -> bool:
        return author in self._convicted

    def convicted(self) -> frozenset[bytes]:
        return frozenset(self._convicted)

    def convictions(self) -> dict[bytes, bytes]:
        """Convicted author -> key of the evidence that convicted it."""
        return dict(self._convicted)

    def max_seq(self, author: bytes) -> int | None:
        seqs = [self.adds[i].header.seq for i in self._by_author.get(author, ())]
        return max(seqs) if seqs else None

    def root(self) -> bytes:
        return self._tree.root()

    # -- operations --------------------------------------------------------

    def add(self, signed: SignedHeader) -> Changes:
        cid = signed.id
        changes = Changes()
        if cid in self.adds:
            changes.duplicate = True
            return changes
        header = signed.header
        self.adds[cid] = signed
        self._by_author.setdefault(header.author, []).append(cid)
        same_dot = self._by_dot.setdefault(header.dot, [])
        same_dot.append(cid)
        if len(same_dot) > 1 and header.author not in self._convicted:
            proof = Equivocation.of(self.adds[same_dot[0]], signed)
            self._record_evidence(proof, changes)
        if self._should_be_live(cid):
            self._insert_live(cid, changes)
        return changes

    def remove(self, removal: Removal) -> Changes:
        changes = Changes()
        if removal.key in self.removals:
            changes.duplicate = True
            return changes
        self.removals[removal.key] = removal
        for dot in removal.dots:
            self._tombstones.add((removal.target, dot))
        if self.is_live(removal.target) and not self._should_be_live(removal.target):
            self._remove_live(removal.target, changes)
        return changes

    def add_evidence(self, proof: Equivocation) -> Changes:
        changes = Changes()
        if proof.key in self.evidence:
            changes.duplicate = True
            return changes
        self._record_evidence(proof, changes)
        return changes

    # -- internals -----------------------------------------------------------

    def _should_be_live(self, cid: bytes) -> bool:
        signed = self.adds.get(cid)
        if signed is None:
            return False
        header = signed.header
        return header.author not in self._convicted and (cid, header.dot) not in self._tombstones

    def _record_evidence(self, proof: Equivocation, changes: Changes) -> None:
        self.evidence[proof.key] = proof
        changes.evidence.append(proof)
        author = proof.author
        if author in self._convicted:
            return
        self._convicted[author] = proof.key
        changes.convicted.append(author)
        for cid in self._by_author.get(author, ()):
            if self.is_live(cid):
                self._remove_live(cid, changes)

    def _insert_live(self, cid: bytes, changes: Changes) -> None:
        pos = bisect_left(self._live, cid)
        self._live.insert(pos, cid)
        self._tree.insert(pos, cid)
        changes.added.append(cid)

    def _remove_live(self, cid: bytes, changes: Changes) -> None:
        pos = bisect_left(self._live, cid)
        del self._live[pos]
        self._tree.delete(pos)
        changes.removed.append(cid)
