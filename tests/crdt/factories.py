"""Deterministic building blocks for crdt tests: keys, schemas, tensors."""

from __future__ import annotations

import hashlib

import numpy as np

from meshmerge.crdt import MergeState, Signer
from meshmerge.proto.messages import SetSchema, TensorEntry

SHAPES = {"layer.0.bias": (4,), "layer.0.weight": (4, 3), "layer.1.weight": (2, 4)}


def signer(n: int) -> Signer:
    return Signer(hashlib.sha256(b"meshmerge-test-key-%d" % n).digest())


def schema(name: str = "test/round-1", kind: str = "weights", dtype: str = "F32", **kw: object) -> SetSchema:
    tensors = tuple(TensorEntry(n, dtype, s) for n, s in sorted(SHAPES.items()))
    return SetSchema(name=name, kind=kind, tensors=tensors, **kw)  # type: ignore[arg-type]


def tensors(seed: int, dtype: type = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in sorted(SHAPES.items())}


def state(name: str = "test/round-1") -> MergeState:
    return MergeState(schema(name))
