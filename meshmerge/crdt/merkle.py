"""Merkle root over the canonically ordered live contribution ids.

RFC 6962 (Certificate Transparency) tree hashing: leaf = SHA-256(0x00 ‖ id),
node = SHA-256(0x01 ‖ left ‖ right), the tree split at the largest power of
two below n, and the empty tree's root is SHA-256 of the empty string. The
domain bytes stop a leaf from being passed off as an inner node. Building
bottom-up and carrying an odd last node up unchanged gives the same tree as
the RFC's recursive definition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(item: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + item).digest()


def root_of_leaves(leaves: Sequence[bytes]) -> bytes:
    """Root given the leaf hashes, in order."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        paired = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def merkle_root(items: Sequence[bytes]) -> bytes:
    return root_of_leaves([leaf_hash(i) for i in items])
