"""The float64 coordinate TIES kernel against the numpy code it replaced, byte for byte."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshmerge.cext import using_threads
from meshmerge.cext.ties64 import ties_coordinates


def trim(v: np.ndarray, density: float) -> np.ndarray:
    """Keep the entries of v whose magnitude is at least the ceil(density * size)-th largest."""
    a = np.abs(v).reshape(-1)
    keep = max(1, math.ceil(density * a.size))
    if keep >= a.size:
        return v
    thresh = np.partition(a, a.size - keep)[a.size - keep]
    return np.where(np.abs(v) >= thresh, v, 0.0)


def reference(vs: list[np.ndarray], w: list[float], density: float) -> np.ndarray:
    """spectral.ties_coordinates as it was in numpy: trim, elect, weighted mean of agreeing."""
    trimmed = [trim(v, density) for v in vs]
    total = np.zeros_like(trimmed[0])
    for wk, v in zip(w, trimmed, strict=True):
        total = total + wk * v
    sign = np.sign(total)
    num = np.zeros_like(total)
    den = np.zeros_like(total)
    for wk, v in zip(w, trimmed, strict=True):
        agree = (np.sign(v) == sign) & (v != 0.0)
        num = num + np.where(agree, wk * v, 0.0)
        den = den + np.where(agree, wk, 0.0)
    return np.where(den > 0.0, num / np.where(den > 0.0, den, 1.0), 0.0)


def tasks(shape: tuple[int, int], nk: int, seed: int) -> tuple[list[np.ndarray], list[float]]:
    rng = np.random.default_rng(seed)
    vs = [rng.standard_normal(shape) * (rng.random(shape) < 0.7) for _ in range(nk)]
    vs[0].flat[0] = -0.0
    if nk > 1:  # exact cancellations and repeated magnitudes at the threshold
        vs[1] = vs[0].copy()
        vs[1][:, :1] = -vs[0][:, :1]
    if nk > 2:
        vs[2] = np.round(vs[2])  # many equal magnitudes
    w = [float(x) for x in rng.random(nk)]
    w[0] = 0.0
    return vs, w


@pytest.mark.parametrize(
    ("shape", "nk", "density"),
    [((1, 1), 1, 0.5), ((3, 7), 3, 0.3), ((40, 50), 5, 0.5), ((16, 33), 16, 1.0), ((10, 10), 4, 0.01),
     ((64, 300), 16, 0.2)],
)
def test_same_bytes_as_the_numpy_code(shape: tuple[int, int], nk: int, density: float) -> None:
    vs, w = tasks(shape, nk, shape[0] * shape[1] + nk)
    ref = reference(vs, w, density).tobytes()
    for threads in (1, 2):
        with using_threads(threads, grain=8):
            assert ties_coordinates(vs, w, density).tobytes() == ref, threads


def test_one_magnitude_bucket() -> None:
    """All magnitudes share their top 16 bits: the threshold search cannot gather the bucket and
    rescans the matrix (the path large matrices take when one bucket holds >= 2^20 values)."""
    rng = np.random.default_rng(11)
    vs = [(1.0 + 0.01 * rng.random((30, 40))) * rng.choice([-1.0, 1.0], (30, 40)) for _ in range(5)]
    w = [float(x) for x in rng.random(5)]
    for density in (0.1, 0.5, 0.99):
        assert ties_coordinates(vs, w, density).tobytes() == reference(vs, w, density).tobytes()


def test_read_only_inputs() -> None:
    vs, w = tasks((6, 9), 3, 5)
    for v in vs:
        v.setflags(write=False)
    assert ties_coordinates(vs, w, 0.4).tobytes() == reference(vs, w, 0.4).tobytes()


def test_all_zero_and_disagreeing_inputs() -> None:
    z = [np.zeros((4, 5)), -np.zeros((4, 5))]
    assert ties_coordinates(z, [0.5, 0.5], 0.5).tobytes() == np.zeros((4, 5)).tobytes()
    v = np.ones((2, 2))
    out = ties_coordinates([v, -v], [0.5, 0.5], 1.0)
    assert out.tobytes() == reference([v, -v], [0.5, 0.5], 1.0).tobytes()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        ties_coordinates([np.ones((2, 2)), np.full((2, 2), np.inf)], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="shapes"):
        ties_coordinates([np.ones((2, 2)), np.ones((2, 3))], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="weights"):
        ties_coordinates([np.ones((2, 2))], [0.5, 0.5], 0.5)
    with pytest.raises(ValueError, match="density"):
        ties_coordinates([np.ones((2, 2))], [1.0], 0.0)
    with pytest.raises(ValueError, match="at least one"):
        ties_coordinates([], [], 0.5)
