"""The selective kernels' exact accumulator and argument checks (the per-element
results are compared with their numpy definitions in tests/crdt/strategies/test_selective.py)."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from meshmerge.cext import (
    EXACT_LIMBS,
    exact_round,
    led_select,
    nearswap_merge,
    sce_combine,
    sce_energy,
    sce_variance,
)


def energies(xs: list[np.ndarray], b: np.ndarray | None, var: np.ndarray | None = None, thr: float = -1.0,
             threads: int = 0, pieces: int = 1) -> list[float]:
    """sce_energy over ``pieces`` consecutive chunks, in reverse order, then rounded."""
    acc = np.zeros((len(xs), EXACT_LIMBS), np.uint64)
    cuts = np.linspace(0, xs[0].size, pieces + 1).astype(int)
    for lo, hi in reversed(list(pairwise(cuts.tolist()))):
        got = sce_energy([x[lo:hi] for x in xs], None if b is None else b[lo:hi],
                         None if var is None else var[lo:hi], thr, acc, threads)
        assert got == -1
    return exact_round(acc)


def fsum_squares(x: np.ndarray, b: np.ndarray | None, sel: np.ndarray | None = None) -> float:
    t = x.astype(np.float64) - (b.astype(np.float64) if b is not None else 0.0)
    sq = t * t
    return math.fsum((sq if sel is None else sq[sel]).tolist())


def wide(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 values from subnormal to the largest finite, with zeros."""
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-45, 39, n)).astype(np.float32)
    x[~np.isfinite(x)] = np.float32(3.4e38)
    return np.where(rng.random(n) < 0.05, np.float32(0.0), x)


@pytest.mark.parametrize("seed", range(6))
def test_energy_is_the_correctly_rounded_exact_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20_000))
    xs = [wide(rng, n), rng.standard_normal(n).astype(np.float32),
          (rng.integers(-4096, 4096, n) * 2.0 ** -30).astype(np.float32)]
    b = rng.standard_normal(n).astype(np.float32) if seed % 2 else None
    want = [fsum_squares(x, b) for x in xs]
    for threads, pieces in ((1, 1), (2, 7), (3, 3)):
        assert energies(xs, b, threads=threads, pieces=pieces) == want


def test_energy_rounds_ties_to_even_and_uses_the_sticky_bits() -> None:
    cases = [
        [1.0, 2.0**-27, 2.0**-27],  # 1 + 2^-53: a tie, stays 1.0 (even)
        [1.0, 2.0**-27, 2.0**-27, 2.0**-60],  # just above the tie: rounds up
        [1.0 + 2.0**-23, 2.0**-27, 2.0**-27],  # odd last bit at the tie: rounds up
        [2.0**-149] * 9,  # float32 subnormals: squares far below float32's range
        [3.4e38] * 1000,  # the largest squares
        [0.0, -0.0],
    ]
    for vals in cases:
        x = np.array(vals, np.float32)
        assert energies([x], None) == [fsum_squares(x, None)], vals
    assert energies([np.array([0.0], np.float32)], None) == [0.0]


def test_energy_selects_by_threshold_and_counts_many_terms() -> None:
    rng = np.random.default_rng(9)
    n = 300_000  # more terms per limb than one carry span
    x = np.full(n, 3.0e38, np.float32)
    x[::3] = rng.standard_normal(x[::3].size).astype(np.float32)
    var = rng.random(n)
    sel = var >= 0.25
    assert energies([x], None, var, 0.25, threads=3, pieces=4) == [fsum_squares(x, None, sel)]


def test_kernels_report_the_first_nonfinite_input() -> None:
    n = 5000
    xs = [np.ones(n, np.float32) for _ in range(4)]
    xs[3][4999] = np.inf
    xs[2][7] = np.nan
    acc = np.zeros((4, EXACT_LIMBS), np.uint64)
    out = np.empty(n, np.float32)
    assert sce_variance(xs, None, 0.25, np.empty(n), 2) == 2
    assert sce_energy(xs, None, None, -1.0, acc, 2) == 2
    assert sce_combine(xs, None, None, -1.0, np.full(4, 0.25), out, 2) == 2
    assert led_select(xs, np.full(4, 0.25), out, 2) == 2
    assert nearswap_merge(xs[3], xs[0], 0.1, out, 2) == 0
    neg_nan = np.array([0xFFC00000, 0xFF800001], np.uint32).view(np.float32)  # NaNs with the sign bit
    for x in (neg_nan, -neg_nan):
        assert sce_energy([np.ones(2, np.float32), x], None, None, -1.0, np.zeros((2, EXACT_LIMBS), np.uint64)) == 1
    assert nearswap_merge(xs[0], xs[1], 0.1, out, 2) == -1


def test_kernels_check_their_arguments() -> None:
    xs = [np.ones(10, np.float32), np.ones(10, np.float32)]
    with pytest.raises(ValueError, match="shape"):
        sce_energy(xs, None, None, -1.0, np.zeros((3, EXACT_LIMBS), np.uint64))
    with pytest.raises(ValueError, match="var has 9 elements"):
        sce_energy(xs, None, np.zeros(9), 0.0, np.zeros((2, EXACT_LIMBS), np.uint64))
    with pytest.raises(ValueError, match="not carried"):
        exact_round(np.full((1, EXACT_LIMBS), 1 << 40, np.uint64))
    with pytest.raises(ValueError, match="coefficients"):
        sce_combine(xs, None, None, -1.0, np.ones(3), np.empty(10, np.float32))
    with pytest.raises(ValueError, match="no inputs"):
        led_select([], np.ones(0), np.empty(10, np.float32))
    with pytest.raises(ValueError, match="expected 10"):
        led_select([np.ones(9, np.float32)], np.ones(1), np.empty(10, np.float32))
    with pytest.raises(ValueError, match="needs the base"):
        nearswap_merge(xs[0], None, 0.1, np.empty(10, np.float32))
