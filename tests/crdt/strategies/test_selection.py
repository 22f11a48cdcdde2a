"""Exact magnitude thresholds (TIES / breadcrumbs) on tensors large enough for the sampled guess."""

from __future__ import annotations

import numpy as np
import pytest

from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.strategies._stream import TensorStream
from meshmerge.crdt.strategies.sparse import SAMPLE, SAMPLE_BLOCK, SAMPLED_FROM, magnitude_thresholds
from meshmerge.crdt.tensors import TensorSpec, from_f32, to_f32

M = SAMPLED_FROM + 1234


def _stream(xs: list[np.ndarray], base: np.ndarray | None, dtype: str = "F32") -> TensorStream:
    spec = TensorSpec("w", dtype, (xs[0].size,))
    inp = MergeInput([{"w": x} for x in xs], [1.0] * len(xs), "weights" if base is not None else "delta",
                     [spec], bytes(32), {"w": base} if base is not None else None)
    return TensorStream(inp, spec, 1 << 16, base=base is not None)


def _reference(xs: list[np.ndarray], base: np.ndarray | None, dtype: str, rank: int) -> list[float]:
    out = []
    for x in xs:
        v = to_f32(x, dtype).astype(np.float64)
        if base is not None:
            v = v - to_f32(base, dtype).astype(np.float64)
        mag = np.abs(v).astype(np.float32)
        out.append(float(np.partition(mag, mag.size - rank)[mag.size - rank]))
    return out


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_thresholds_match_a_full_partition(dtype: str) -> None:
    rng = np.random.default_rng(11)
    base = from_f32(rng.standard_normal(M).astype(np.float32), dtype)
    xs = [from_f32(to_f32(base, dtype) + rng.standard_normal(M).astype(np.float32) * 0.01, dtype)
          for _ in range(3)]
    ranks = [1, 7, M // 5, M // 2, M]
    got = magnitude_thresholds(_stream(xs, base, dtype), ranks)
    for j, r in enumerate(ranks):
        assert got[:, j].tolist() == _reference(xs, base, dtype, r), r


def test_thresholds_stay_exact_when_the_sample_is_misleading() -> None:
    """The sampled blocks hold zeros, the rest large values (and the other way round):
    the guessed range is wrong, the counting passes still find the exact value."""
    rng = np.random.default_rng(12)
    blocks = SAMPLE // SAMPLE_BLOCK
    starts = (np.arange(blocks, dtype=np.int64) * M) // blocks
    sampled = np.zeros(M, bool)
    for s in starts:
        sampled[s : s + SAMPLE_BLOCK] = True
    big = rng.standard_normal(M).astype(np.float32) + np.float32(10.0)
    low = np.where(sampled, np.float32(0.0), big)
    high = np.where(sampled, np.float32(1e6), rng.standard_normal(M).astype(np.float32) * np.float32(1e-3))
    ranks = [M // 5, M - 5]
    got = magnitude_thresholds(_stream([low, high], None), ranks)
    for j, r in enumerate(ranks):
        assert got[:, j].tolist() == _reference([low, high], None, "F32", r), r


def test_ties_equal_to_the_threshold_are_all_counted() -> None:
    x = np.zeros(M, np.float32)
    x[: M // 3] = 2.0
    x[M // 3 : M // 2] = -1.0
    got = magnitude_thresholds(_stream([x], None), [M // 3 + 10, M // 2, M // 2 + 1])
    assert got[0].tolist() == [1.0, 1.0, 0.0]
