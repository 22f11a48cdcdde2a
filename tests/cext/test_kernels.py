"""Kernels against straightforward numpy references."""

import numpy as np
import pytest

from meshmerge.cext import (
    bf16_to_f32,
    f32_to_bf16,
    gram_accumulate,
    gram_finalize,
    has_nonfinite,
    mag_hist_hi,
    sorted_reduce,
    weighted_sum_f32,
)
from meshmerge.crdt.tensors import from_f32


def test_weighted_sum_reports_nonfinite_input() -> None:
    xs = [np.ones(600, np.float32), np.ones(600, np.float32)]
    xs[1][555] = np.inf
    assert weighted_sum_f32(xs, np.ones(2), np.empty(600, np.float32)) == 1
    xs[1][555] = np.nan
    assert weighted_sum_f32(xs, np.ones(2), np.empty(600, np.float32)) == 1
    xs[1][555] = np.finfo(np.float32).max
    assert weighted_sum_f32(xs, np.ones(2), np.empty(600, np.float32)) == -1


def test_has_nonfinite() -> None:
    x = np.zeros(100, np.float32)
    assert not has_nonfinite(x)
    x[7] = -np.inf
    assert has_nonfinite(x)


def test_bf16_roundtrip_matches_numpy_reference() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(10_000).astype(np.float32) * 100
    x[:4] = [np.nan, np.inf, -np.inf, 0.0]
    bits = np.empty(x.size, np.uint16)
    f32_to_bf16(x, bits)
    assert np.array_equal(bits[1:], from_f32(x, "BF16")[1:])
    assert (bits[0] & 0x7F80) == 0x7F80 and (bits[0] & 0x7F) != 0
    back = np.empty(x.size, np.float32)
    bf16_to_f32(bits, back.view(np.uint32))
    assert np.array_equal(back.view(np.uint32)[1:], bits[1:].astype(np.uint32) << 16)


def test_gram_matches_numpy_and_ignores_chunking() -> None:
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal(1003).astype(np.float32) for _ in range(4)]
    base = rng.standard_normal(1003).astype(np.float32)
    d = [x.astype(np.float64) - base for x in xs]
    ref = np.array([[np.dot(a, b) for b in d] for a in d])
    results = []
    for chunk in (1003, 8, 13, 64):
        lanes = np.zeros((4, 4, 8))
        for lo in range(0, 1003, chunk):
            hi = min(lo + chunk, 1003)
            assert gram_accumulate([x[lo:hi] for x in xs], base[lo:hi], lo, lanes) == -1
        results.append(gram_finalize(lanes))
    for g in results:
        assert g.tobytes() == results[0].tobytes()
    np.testing.assert_allclose(results[0], ref, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16])
def test_median_and_trimmed_mean_match_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal(777).astype(np.float32) for _ in range(n)]
    xs[0][:50] = xs[-1][:50]  # ties
    stack = np.sort(np.stack(xs).astype(np.float64), axis=0)
    out = np.empty(777, np.float32)
    assert sorted_reduce(xs, 0, 0, out) == -1
    ref = stack[n // 2] if n % 2 else (stack[n // 2 - 1] + stack[n // 2]) * 0.5
    assert np.array_equal(out, ref.astype(np.float32))
    trim = (n - 1) // 2 if n > 2 else 0
    assert sorted_reduce(xs, 1, trim, out) == -1
    acc = np.zeros(777)
    for r in range(trim, n - trim):
        acc = acc + stack[r]
    assert np.array_equal(out, (acc / (n - 2 * trim)).astype(np.float32))


def test_magnitude_histogram_counts_every_element() -> None:
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(500).astype(np.float32) for _ in range(3)]
    hist = np.zeros((3, 65536), np.uint64)
    assert mag_hist_hi(xs, None, hist) == -1
    assert hist.sum(axis=1).tolist() == [500, 500, 500]
    bins = (np.abs(xs[1]).view(np.uint32) >> 15).astype(np.int64)
    assert np.array_equal(hist[1], np.bincount(bins, minlength=65536).astype(np.uint64))


def test_magnitude_selection_with_two_ranks_in_one_bin() -> None:
    from meshmerge.cext import mag_hist_lo

    x = np.array([1.0, 1.0000001, 1.0000002, 1.0000004, 3.0, -1.0000003], np.float32)
    bins = np.abs(x).view(np.uint32) >> 15
    target = np.array([[bins[0], bins[0]]], np.uint32)
    hist = np.zeros((1, 2, 32768), np.uint64)
    mag_hist_lo([x], None, target, hist)
    assert hist[0, 0].sum() == 5 and hist[0, 1].sum() == 5
    one = np.zeros((1, 1, 32768), np.uint64)
    mag_hist_lo([x], None, target[:, :1], one)
    assert one[0, 0].sum() == 5
