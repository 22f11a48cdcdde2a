"""Shared building blocks for store tests."""

from __future__ import annotations

from pathlib import Path

from meshmerge.crdt import MergeState
from meshmerge.crdt.tensorfile import dumps
from meshmerge.daemon.store import Store, StoreLimits
from meshmerge.proto.messages import SignedHeader
from tests.crdt.factories import schema
from tests.crdt.pool import POOL


def blob_of(signed: SignedHeader) -> bytes:
    """The safetensors bytes of a pool contribution."""
    t = POOL.blobs[signed.id]
    return dumps(t, {e.name: e.dtype for e in signed.header.tensors})


def live_state() -> MergeState:
    """Every pool operation applied: adds, removals, an equivocation."""
    state = MergeState(schema())
    for op in POOL.ops():
        state.apply(op)
    return state


def open_store(path: Path, **limits: int) -> Store:
    return Store.open(path, StoreLimits(**limits), fsync=False)
