"""Streaming access to the contributions of one tensor, chunk by chunk.

Strategies never materialise N full models: they walk each tensor in chunks
of ``chunk`` elements, widening only the current chunk to float32 (float32
inputs are used in place, so memory-mapped safetensors are read once without
a copy). Peak memory is the float32 output of one tensor plus, for 16-bit
inputs, N widened chunks.

Precision: F32, F16 and BF16 inputs widen exactly to float32; kernels
accumulate in float64 and round once to float32, then to the storage dtype
(round to nearest even). F64 tensors are accepted but narrowed to float32
first, so they are merged at float32 precision.

Also the single place that checks a contribution's tensor against its spec
and turns a kernel's "input k has NaN/Inf" report into a StrategyError.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import bf16_to_f32, f32_to_bf16, has_nonfinite
from meshmerge.crdt.strategies.base import MergeInput, StrategyError, Tensors
from meshmerge.crdt.tensors import STORAGE_DTYPES, TensorSpec

F32 = npt.NDArray[np.float32]


def _flat(tensors: Tensors, spec: TensorSpec, who: str) -> npt.NDArray[Any]:
    try:
        arr = tensors[spec.name]
    except KeyError:
        raise StrategyError(f"{who} has no tensor {spec.name!r}") from None
    arr = np.asarray(arr)
    want = STORAGE_DTYPES[spec.dtype]
    if arr.dtype != want:
        raise StrategyError(
            f"{who} tensor {spec.name!r}: dtype {arr.dtype} does not match spec {spec.dtype} ({want})"
        )
    if tuple(arr.shape) != tuple(spec.shape):
        raise StrategyError(
            f"{who} tensor {spec.name!r}: shape {tuple(arr.shape)} does not match spec {tuple(spec.shape)}"
        )
    return arr.reshape(-1)


def _widen(flat: npt.NDArray[Any], dtype: str, lo: int, hi: int) -> F32:
    part = flat[lo:hi]
    if dtype == "F32":
        return np.ascontiguousarray(part)
    if dtype == "BF16":
        out = np.empty(hi - lo, dtype=np.float32)
        bf16_to_f32(np.ascontiguousarray(part), out.view(np.uint32))
        return out
    return np.ascontiguousarray(part, dtype=np.float32)


class TensorStream:
    """The N contributions (and optionally the base) of one tensor, in chunks."""

    def __init__(self, inp: MergeInput, spec: TensorSpec, chunk: int, *, base: bool = False) -> None:
        self.spec = spec
        self.chunk = chunk
        self.flats = [_flat(t, spec, f"contribution {k}") for k, t in enumerate(inp.tensors)]
        self.base: npt.NDArray[Any] | None = None
        if base:
            if inp.base is None:
                raise StrategyError("this strategy needs the base model (MergeInput.base) for weights")
            self.base = _flat(inp.base, spec, "base model")

    @property
    def numel(self) -> int:
        return self.spec.numel

    def chunks(self) -> Iterator[tuple[int, int, list[F32], F32 | None]]:
        """Yield ``(lo, hi, [x_k[lo:hi] as float32], base[lo:hi] or None)``."""
        for lo in range(0, self.numel, self.chunk):
            hi = min(lo + self.chunk, self.numel)
            xs = [_widen(f, self.spec.dtype, lo, hi) for f in self.flats]
            b = None
            if self.base is not None:
                b = _widen(self.base, self.spec.dtype, lo, hi)
                if has_nonfinite(b):
                    raise StrategyError(f"base model tensor {self.spec.name!r} holds NaN or Inf")
            yield lo, hi, xs, b

    def base_chunks(self) -> Iterator[tuple[int, int, F32 | None]]:
        """Yield ``(lo, hi, base[lo:hi] as float32 or None)`` without touching the contributions."""
        for lo in range(0, self.numel, self.chunk):
            hi = min(lo + self.chunk, self.numel)
            yield lo, hi, None if self.base is None else _widen(self.base, self.spec.dtype, lo, hi)

    def check(self, bad: int) -> None:
        """Raise if a kernel reported a non-finite value in input ``bad``."""
        if bad >= 0:
            raise StrategyError(
                f"contribution {bad} tensor {self.spec.name!r} holds NaN or Inf; "
                "non-finite contributions cannot be merged"
            )

    def finish(self, out: F32) -> npt.NDArray[Any]:
        """Round a float32 result to the storage dtype and give it the spec's shape."""
        return to_storage(out, self.spec)


def in_place_chunk(spec: TensorSpec, chunk: int) -> int:
    """Chunk size for a kernel that reads float32 inputs in place.

    F32 chunks are views (nothing is widened or copied), so one kernel call over
    the whole tensor costs no memory, and it saves a thread fork/join per chunk:
    on a loaded machine a join waits for whichever thread was descheduled, and
    for a memory-bound pass those waits were a large share of the wall time.
    16-bit tensors keep ``chunk``, since their chunks are widened copies.
    Kernels whose results do not depend on the chunk size only.
    """
    return max(spec.numel, 1) if spec.dtype == "F32" else chunk


def unit_sum_weights(inp: MergeInput, family: str) -> list[float]:
    """Weights divided by their correctly rounded total, for means that need them
    non-negative (``family`` names the strategies in the error) and not all zero."""
    w = checked_weights(inp)
    if np.any(w < 0):
        raise StrategyError(f"{family} need non-negative weights")
    total = math.fsum(float(x) for x in w)
    if total == 0.0:
        raise StrategyError("total contribution weight is zero: nothing to average")
    return [float(x) / total for x in w]


def companion_pairs(
    inp: MergeInput, suffix: str, strategy: str, label: str, *, required: bool
) -> list[tuple[TensorSpec, TensorSpec | None]]:
    """Each tensor with its ``<name><suffix>`` companion (Fisher, Gram diagonal), in spec order.

    A companion without its tensor, a tensor without its companion (when companions are
    ``required`` or any tensor has one) and a shape mismatch are errors: nothing is
    silently left out of the merged model. Without companions (and not required) every
    companion is None.
    """
    by_name = {s.name: s for s in inp.specs}
    companions = {s.name for s in inp.specs if s.name.endswith(suffix)}
    plain = [s for s in inp.specs if s.name not in companions]
    if not companions and not required:
        return [(spec, None) for spec in plain]
    orphans = sorted(c for c in companions if c[: -len(suffix)] not in by_name)
    if orphans:
        raise StrategyError(
            f"{strategy}: {label} tensor(s) {orphans[:5]} have no tensor to go with them "
            f"('<name>{suffix}' needs '<name>')"
        )
    missing = [s.name for s in plain if s.name + suffix not in by_name]
    if missing:
        raise StrategyError(
            f"{strategy} needs a {label} companion tensor '<name>{suffix}' for every tensor"
            f"{'' if required else ' once one tensor has one'}; missing for {missing[:5]}"
        )
    pairs: list[tuple[TensorSpec, TensorSpec | None]] = []
    for spec in plain:
        comp = by_name[spec.name + suffix]
        if comp.shape != spec.shape:
            raise StrategyError(f"{label} tensor {comp.name!r} shape {comp.shape} != {spec.shape}")
        pairs.append((spec, comp))
    return pairs


def to_storage(out: F32, spec: TensorSpec) -> npt.NDArray[Any]:
    if spec.dtype == "F32":
        res: npt.NDArray[Any] = out
    elif spec.dtype == "BF16":
        res = np.empty(out.shape, dtype=np.uint16)
        f32_to_bf16(np.ascontiguousarray(out).reshape(-1), res.reshape(-1))
    else:
        res = out.astype(STORAGE_DTYPES[spec.dtype])
    return res.reshape(spec.shape)


def task_base(inp: MergeInput, strategy: str) -> bool:
    """Whether task vectors need the base subtracted (weights) or are given (delta)."""
    if inp.kind == "delta":
        return False
    if inp.base is None:
        raise StrategyError(
            f"{strategy} works on task vectors: give delta contributions, or weights with the base model"
        )
    return True


def checked_weights(inp: MergeInput, *, positive: bool = False) -> npt.NDArray[np.float64]:
    w = inp.weight_array()
    if not np.all(np.isfinite(w)):
        raise StrategyError("contribution weights must be finite")
    if positive and not np.all(w > 0):
        raise StrategyError("this strategy needs every contribution weight to be > 0")
    return w
