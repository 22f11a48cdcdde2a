"""Pure replicated state: signed contributions, the OR-Set, Merkle roots, merging.

No I/O, no trio, no libp2p: everything here is a deterministic function of
its inputs so replicas and tests agree byte for byte.
"""

from meshmerge.crdt.signing import Signer
from meshmerge.crdt.state import (
    ApplyReport,
    Incomplete,
    MergeState,
    MergeStateError,
    SchemaMismatch,
    TensorMismatch,
    digest_of_tensors,
    manifest_of,
    verify_tensors,
)

__all__ = [
    "ApplyReport",
    "Incomplete",
    "MergeState",
    "MergeStateError",
    "SchemaMismatch",
    "Signer",
    "TensorMismatch",
    "digest_of_tensors",
    "manifest_of",
    "verify_tensors",
]
