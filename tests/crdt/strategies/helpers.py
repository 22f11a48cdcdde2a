"""Inputs and references shared by the strategy tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import stream_key, uniform_f64
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.tensors import STORAGE_DTYPES, TensorSpec, from_f32, to_f32

SEED = bytes(range(32))
SHAPES = {"blk.0.w": (13, 21), "blk.0.b": (37,), "emb": (4, 3, 11)}


def det_values(tag: str, n: int, scale: float = 1.0) -> npt.NDArray[np.float32]:
    """Platform-independent pseudo-random float32 values in [-scale, scale) (our own PRNG)."""
    u = np.empty(n, dtype=np.float64)
    uniform_f64(stream_key(SEED, tag, 0), 0, u)
    return ((u * 2.0 - 1.0) * scale).astype(np.float32)


def make_input(
    n: int,
    *,
    kind: str = "weights",
    dtype: str = "F32",
    weights: list[float] | None = None,
    spread: float = 0.05,
    tag: str = "t",
    with_base: bool = True,
    quantize: bool = False,
) -> MergeInput:
    """N contributions near a base model; ``quantize`` rounds values to multiples of 2^-8."""
    specs = [TensorSpec(name, dtype, shape) for name, shape in sorted(SHAPES.items())]

    def store(v: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        if quantize:
            v = (np.round(v * 256.0) / 256.0).astype(np.float32)
        return from_f32(v, dtype)

    base = {s.name: store(det_values(f"{tag}/base/{s.name}", s.numel).reshape(s.shape)) for s in specs}
    contribs = []
    for k in range(n):
        t = {}
        for s in specs:
            delta = det_values(f"{tag}/{k}/{s.name}", s.numel, spread).reshape(s.shape)
            if kind == "delta":
                t[s.name] = store(delta)
            else:
                t[s.name] = store(to_f32(base[s.name], dtype) + delta)
        contribs.append(t)
    w = weights if weights is not None else [1.0 + (k % 3) for k in range(n)]
    return MergeInput(contribs, w, kind, specs, SEED, base if with_base else None)


def f32(a: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float64]:
    return to_f32(np.asarray(a), dtype).astype(np.float64).reshape(-1)


def run(name: str, inp: MergeInput, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return strategies.get(name).run(inp, params, **kw)


def storage(ref: npt.NDArray[np.float64], spec: TensorSpec) -> npt.NDArray[Any]:
    return from_f32(ref.astype(np.float32), spec.dtype).reshape(spec.shape)


def same(a: npt.NDArray[Any], b: npt.NDArray[Any]) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def storage_dtype(dtype: str) -> np.dtype[Any]:
    return STORAGE_DTYPES[dtype]
