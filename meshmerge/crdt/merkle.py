"""Merkle root over the canonically ordered live contribution ids.

RFC 6962 (Certificate Transparency) tree hashing: leaf = SHA-256(0x00 ‖ id),
node = SHA-256(0x01 ‖ left ‖ right), the tree split at the largest power of
two below n, and the empty tree's root is SHA-256 of the empty string. The
domain bytes stop a leaf from being passed off as an inner node. Building
bottom-up and carrying an odd last node up unchanged gives the same tree as
the RFC's recursive definition.

Theory of operation (:class:`MerkleTree`)
-----------------------------------------
The RFC tree over n leaves is a row of *perfect* subtrees, one per set bit
of n, largest first; the root folds them right to left. A perfect subtree of
2^k leaves starting at position p (p a multiple of 2^k) only depends on those
leaves, so the tree caches every perfect subtree's hash, level by level
(``levels[k][i]`` covers leaves ``[i·2^k, (i+1)·2^k)``).

Inserting or deleting the leaf at position p shifts every leaf after it, so
exactly the subtrees that end after p are stale and those entirely before p
stay valid. The tree records the lowest changed position and, when the root
is asked for, rehashes only from there: ``n - p`` node hashes instead of
``n``, plus ``log n`` to fold. Any structure that yields the RFC 6962 bytes
over a *sorted* list must pay this: after an insert at p every pair of
adjacent leaves right of p is new, so ~(n - p)/2 level-1 hashes alone are
unavoidable. Ids are uniform hashes, so a random change costs n/2 hashes on
average, and a change near the end (or a batch of changes, which share one
rehash from their lowest position) costs far less.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
_sha256 = hashlib.sha256


def leaf_hash(item: bytes) -> bytes:
    return _sha256(b"\x00" + item).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def root_of_leaves(leaves: Sequence[bytes]) -> bytes:
    """Root given the leaf hashes, in order."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def merkle_root(items: Sequence[bytes]) -> bytes:
    return root_of_leaves([leaf_hash(i) for i in items])


class MerkleTree:
    """RFC 6962 root of an ordered list that changes by single inserts and deletes.

    The caller owns the order (the OR-Set keeps its live ids sorted) and
    tells the tree the position of each change; see the module docstring for
    what is cached and what a change costs.
    """

    __slots__ = ("_clean", "_levels", "_root")

    def __init__(self) -> None:
        #: levels[0] = leaf hashes; levels[k][i] = perfect subtree over leaves [i·2^k, (i+1)·2^k)
        self._levels: list[list[bytes]] = [[]]
        #: leaves [0, _clean) are unchanged since the upper levels were last built
        self._clean = 0
        self._root: bytes | None = EMPTY_ROOT

    def __len__(self) -> int:
        return len(self._levels[0])

    def insert(self, pos: int, item: bytes) -> None:
        """Insert ``item`` (an id, hashed here as a leaf) so it becomes leaf ``pos``."""
        leaves = self._levels[0]
        if not 0 <= pos <= len(leaves):
            raise IndexError(f"insert position {pos} outside [0, {len(leaves)}]")
        leaves.insert(pos, leaf_hash(item))
        self._changed(pos)

    def delete(self, pos: int) -> None:
        """Remove leaf ``pos``."""
        leaves = self._levels[0]
        if not 0 <= pos < len(leaves):
            raise IndexError(f"delete position {pos} outside [0, {len(leaves)})")
        del leaves[pos]
        self._changed(pos)

    def _changed(self, pos: int) -> None:
        if pos < self._clean:
            self._clean = pos
        self._root = None

    def root(self) -> bytes:
        if self._root is None:
            self._rebuild()
            self._root = self._fold()
        return self._root

    def _rebuild(self) -> None:
        """Rehash every perfect subtree that covers a leaf at or after ``_clean``."""
        levels, clean = self._levels, self._clean
        k = 1
        while len(levels[k - 1]) >= 2:
            below = levels[k - 1]
            if k == len(levels):
                levels.append([])
            keep = clean >> k  # subtrees of this level that end before the first change
            level = levels[k]
            del level[keep:]
            start = 2 * keep
            level.extend(map(node_hash, below[start::2], below[start + 1 :: 2]))  # stops at the last pair
            k += 1
        del levels[k:]
        self._clean = len(levels[0])

    def _fold(self) -> bytes:
        """Combine the perfect subtrees (one per set bit of n, largest first) right to left."""
        n = len(self._levels[0])
        if n == 0:
            return EMPTY_ROOT
        acc: bytes | None = None
        for k in range(n.bit_length()):
            if n >> k & 1:
                start = (n >> (k + 1)) << (k + 1)  # the leaves before this subtree: higher bits only
                sub = self._levels[k][start >> k]
                acc = sub if acc is None else node_hash(sub, acc)
        assert acc is not None
        return acc
