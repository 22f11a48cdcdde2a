"""Shared passes: weighted combinations, task-vector merges, model Gram matrices."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import GRAM_SPAN, gram_accumulate, gram_finalize, task_sum_f32, weighted_sum_f32
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._stream import TensorStream, in_place_chunk
from meshmerge.crdt.strategies.base import MergeInput
from meshmerge.crdt.tensors import TensorSpec


def combine_tensor(
    inp: MergeInput, spec: TensorSpec, coef: npt.NDArray[np.float64], chunk: int, *, base: bool
) -> npt.NDArray[Any]:
    """``b + sum_k c_k (x_k - b)`` (or ``sum_k c_k x_k`` without base), float64 accumulation."""
    stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=base)
    out = empty_f32(spec.numel)
    c = np.ascontiguousarray(coef, dtype=np.float64)
    for lo, hi, xs, b in stream.chunks():
        if b is None:
            stream.check(weighted_sum_f32(xs, c, out[lo:hi]))
        else:
            stream.check(_task_chunk(xs, b, c, out[lo:hi]))
    return stream.finish(out)


def _task_chunk(
    xs: list[npt.NDArray[np.float32]],
    b: npt.NDArray[np.float32] | None,
    c: npt.NDArray[np.float64],
    out: npt.NDArray[np.float32],
    *,
    lam: float = 1.0,
    inv_den: float = 1.0,
) -> int:
    return int(task_sum_f32(xs, b, c, lam, inv_den, out))


def model_gram(inp: MergeInput, chunk: int, *, base: bool) -> list[npt.NDArray[np.float64]]:
    """Per-tensor Gram matrices of ``x_k`` (or ``x_k - b``), in spec order.

    The kernel sums whole spans of ``GRAM_SPAN`` elements, so chunks are rounded
    to a multiple of it (the result never depends on ``chunk``).
    """
    n = len(inp.tensors)
    step = max(GRAM_SPAN, chunk // GRAM_SPAN * GRAM_SPAN)
    grams = []
    for spec in inp.specs:
        stream = TensorStream(inp, spec, step, base=base)
        acc = np.zeros((n, n), dtype=np.float64)
        for lo, _hi, xs, b in stream.chunks():
            stream.check(gram_accumulate(xs, b, lo, acc))
        grams.append(gram_finalize(acc))
    return grams


def total_gram(grams: list[npt.NDArray[np.float64]], n: int) -> list[list[float]]:
    """Whole-model Gram matrix: per-tensor entries added in spec order (exactly rounded)."""
    return [[math.fsum(float(g[i, j]) for g in grams) for j in range(n)] for i in range(n)]


def quad(g: list[list[float]], a: list[float], c: list[float]) -> float:
    """``a^T G c`` with a correctly rounded sum (order-independent)."""
    n = len(a)
    return math.fsum(a[i] * g[i][j] * c[j] for i in range(n) for j in range(n))


def matvec(g: list[list[float]], a: list[float]) -> list[float]:
    n = len(a)
    return [math.fsum(g[i][j] * a[j] for j in range(n)) for i in range(n)]
