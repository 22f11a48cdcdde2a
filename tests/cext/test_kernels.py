"""Kernels against straightforward numpy references."""

import numpy as np
import pytest

from meshmerge.cext import (
    GRAM_SPAN,
    bf16_to_f32,
    f32_to_bf16,
    gram_accumulate,
    gram_finalize,
    has_nonfinite,
    mag_range,
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


@pytest.mark.parametrize("n", [1, 3, 4, 5, 9, 16])
def test_gram_matches_numpy_and_ignores_chunking_threads_and_cpu(n: int) -> None:
    m = 3 * GRAM_SPAN + 1003
    rng = np.random.default_rng(n)
    xs = [rng.standard_normal(m).astype(np.float32) for _ in range(n)]
    base = rng.standard_normal(m).astype(np.float32)
    d = [(x - base).astype(np.float64) for x in xs]  # the kernel's v is x - b in float32
    ref = np.array([[np.dot(a, b) for b in d] for a in d])
    results = []
    span_bytes = n * (n + 1) // 2 * 8  # buffer_bytes below this still holds one span
    # isa: 0 best for this CPU, 1 portable C, 2 AVX2 + FMA at most
    for chunk, threads, isa, buf in ((m, 1, 0, 1 << 23), (GRAM_SPAN, 2, 0, 1 << 23),
                                     (2 * GRAM_SPAN, 3, 0, 1), (m, 2, 1, 2 * span_bytes),
                                     (GRAM_SPAN, 1, 1, 1 << 23), (m, 2, 2, 1 << 23)):
        acc = np.zeros((n, n))
        for lo in range(0, m, chunk):
            hi = min(lo + chunk, m)
            got = gram_accumulate([x[lo:hi] for x in xs], base[lo:hi], lo, acc, threads, isa, buf)
            assert got == -1
        results.append(gram_finalize(acc))
    for g in results:
        assert g.tobytes() == results[0].tobytes()
    scale = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    # float32 products summed in float32 over 32 per lane, float64 beyond
    assert np.max(np.abs(results[0] - ref) / scale) < 1e-6
    assert np.array_equal(results[0], results[0].T)


def test_gram_rejects_unaligned_chunks_reports_nan_and_stays_finite_for_huge_values() -> None:
    xs = [np.ones(GRAM_SPAN + 5, np.float32), np.full(GRAM_SPAN + 5, 2.0, np.float32)]
    with pytest.raises(ValueError, match="multiple of GRAM_SPAN"):
        gram_accumulate([x[5:] for x in xs], None, 5, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        gram_accumulate(xs, None, 0, np.zeros((3, 3)))
    xs[1][GRAM_SPAN + 2] = np.inf
    assert gram_accumulate(xs, None, 0, np.zeros((2, 2))) == 1
    # |x| >= 2^60 would overflow float32 products: those blocks use exact float64 products
    for isa in (0, 1, 2):
        big = [np.full(1000, 3e30, np.float32), np.full(1000, -1e25, np.float32)]
        acc = np.zeros((2, 2))
        assert gram_accumulate(big, None, 0, acc, 1, isa) == -1
        g = gram_finalize(acc)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, [[1000 * 9e60, -1000 * 3e55], [-1000 * 3e55, 1000 * 1e50]], rtol=1e-6)


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


def _mag_range(xs, base, lo, hi, shift, nbins=64, threads=1):
    n, r = len(xs), len(lo[0])
    above = np.zeros((n, r), np.uint64)
    hist = np.zeros((n, r, nbins), np.uint64)
    bad = mag_range(
        xs, base, np.array(lo, np.uint32), np.array(hi, np.uint32), np.array(shift, np.int32),
        np.ones((n, r), np.uint8), above, hist, threads,
    )
    return bad, above, hist


def test_magnitude_range_counts_match_numpy(sweep: bool) -> None:
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(5000).astype(np.float32) for _ in range(3)]
    base = rng.standard_normal(5000).astype(np.float32)
    u = [np.abs(x.astype(np.float64) - base).astype(np.float32).view(np.uint32).astype(np.int64) for x in xs]
    med = [int(np.median(v)) for v in u]
    lo = [[m - 5000, m] for m in med]
    hi = [[m + 5000, m + 63] for m in med]
    bad, above, hist = _mag_range(xs, base, lo, hi, [[8, 0]] * 3)
    assert bad == -1
    for k in range(3):
        for r in range(2):
            assert int(above[k, r]) == int((u[k] > hi[k][r]).sum())
            inside = u[k][(u[k] >= lo[k][r]) & (u[k] <= hi[k][r])] - lo[k][r]
            shift = 8 if r == 0 else 0
            assert np.array_equal(hist[k, r], np.bincount(inside >> shift, minlength=64).astype(np.uint64))


def test_magnitude_range_rejects_a_range_wider_than_the_bins() -> None:
    x = [np.ones(10, np.float32)]
    with pytest.raises(ValueError, match="does not fit"):
        _mag_range(x, None, [[0]], [[1000]], [[0]])


def test_magnitude_range_reports_nonfinite_and_ignores_sign() -> None:
    x = np.array([1.0, -1.0, 2.0, -0.0], np.float32)
    one = int(np.float32(1.0).view(np.uint32))
    bad, above, hist = _mag_range([x], None, [[one]], [[one]], [[0]])
    assert bad == -1 and int(above[0, 0]) == 1 and int(hist[0, 0, 0]) == 2
    x[3] = np.nan
    assert _mag_range([x], None, [[one]], [[one]], [[0]])[0] == 0


@pytest.mark.parametrize("threads", [2, 3])
def test_kernels_give_the_same_bytes_for_any_thread_count(threads: int) -> None:
    from meshmerge.cext import sparse_merge, using_threads

    rng = np.random.default_rng(9)
    n = 10_007
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(5)]
    base = rng.standard_normal(n).astype(np.float32)
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    keys = np.arange(5, dtype=np.uint64) * 7919
    results = []
    for t in (1, threads):
        with using_threads(t, grain=40):
            out = [np.empty(n, np.float32) for _ in range(4)]
            assert weighted_sum_f32(xs, w, out[0]) == -1
            assert sorted_reduce(xs, 0, 0, out[1]) == -1
            assert sorted_reduce(xs, 1, 1, out[2]) == -1
            lo = np.full(5, 0.3, np.float32)
            hi = np.full(5, 2.0, np.float32)
            assert sparse_merge(xs, base, w, lo, hi, keys, 20000, 1.4, 1, True, 1.0, 0.9, 13, out[3]) == -1
            bad, above, hist = _mag_range(xs, base, [[1 << 29]] * 5, [[(1 << 29) + 6300]] * 5, [[7]] * 5,
                                        threads=t)
            assert bad == -1
            results.append([o.tobytes() for o in out] + [above.tobytes(), hist.tobytes()])
    assert results[0] == results[1]


def test_nonfinite_input_is_reported_from_any_thread() -> None:
    from meshmerge.cext import using_threads

    xs = [np.ones(9000, np.float32) for _ in range(3)]
    xs[2][8999] = np.inf
    with using_threads(3, grain=64):
        assert weighted_sum_f32(xs, np.ones(3), np.empty(9000, np.float32)) == 2
        assert sorted_reduce(xs, 0, 0, np.empty(9000, np.float32)) == 2


def test_thread_settings_are_validated() -> None:
    from meshmerge.cext import set_threads

    with pytest.raises(ValueError, match="threads must be an integer"):
        set_threads(0)
    with pytest.raises(ValueError, match="grain must be a positive integer"):
        set_threads(2, grain=0)


@pytest.mark.parametrize("with_base", [True, False])
def test_task_sum_matches_the_untrimmed_sparse_merge(with_base: bool) -> None:
    from meshmerge.cext import sparse_merge, task_sum_f32

    rng = np.random.default_rng(21)
    n = 5003
    xs = [rng.standard_normal(n).astype(np.float32) for _ in range(6)]
    xs[2][:7] = 0.0
    base = rng.standard_normal(n).astype(np.float32) if with_base else None
    w = np.array([1.0, 0.5, 2.0, 3.0, 0.25, 1.5])
    a = np.empty(n, np.float32)
    b = np.empty(n, np.float32)
    assert task_sum_f32(xs, base, w, 0.7, 1 / 8.25, a) == -1
    zeros, infs = np.zeros(6, np.float32), np.full(6, np.inf, np.float32)
    assert sparse_merge(xs, base, w, zeros, infs, None, 0, 1.0, 0, False, 1 / 8.25, 0.7, 0, b) == -1
    assert a.tobytes() == b.tobytes()
    xs[4][4000] = np.nan
    assert task_sum_f32(xs, base, w, 0.7, 1.0, a) == 4


def _mag_copies(xs, base, lo, hi, cap, threads=1, grain=None):
    """mag_range with copies for every target: (bad, above, fill, [sorted copies per target])."""
    from meshmerge.cext import using_threads

    n, r = len(xs), len(lo[0])
    caps = np.full((n, r), cap, np.uint64)
    offs = (np.arange(n * r, dtype=np.uint64) * np.uint64(cap)).reshape(n, r)
    fill = np.zeros((n, r), np.uint64)
    cand = np.full(n * r * cap, 0xFFFFFFFF, np.uint32)
    above = np.zeros((n, r), np.uint64)
    hist = np.zeros((n, r, 64), np.uint64)
    lo_a, hi_a = np.array(lo, np.uint32), np.array(hi, np.uint32)
    shift = np.array([[max(0, (int(h) - int(lo_)).bit_length() - 6) for lo_, h in zip(a, b, strict=True)]
                      for a, b in zip(lo_a, hi_a, strict=True)], np.int32)
    with using_threads(threads, grain=grain):
        bad = mag_range(xs, base, lo_a, hi_a, shift, np.ones((n, r), np.uint8), above, hist, 0,
                        cand, offs, caps, fill)
    assert not hist.any()  # targets with copies are not histogrammed
    copies = [np.sort(cand[int(o) : int(o) + min(int(f), cap)])
              for o, f in zip(offs.reshape(-1), fill.reshape(-1), strict=True)]
    return bad, above, fill, copies


@pytest.fixture(params=[False, True], ids=["by-cpu", "portable"])
def sweep(request: pytest.FixtureRequest):
    """Run a test with mag_range's CPU-specific sweep and again with the portable one."""
    from meshmerge.cext.sparse import use_portable_sweep

    use_portable_sweep(request.param)
    yield request.param
    use_portable_sweep(False)


@pytest.mark.parametrize(("threads", "grain"), [(1, None), (2, 512), (3, 300)])
def test_magnitude_range_copies_exactly_the_values_in_range(threads: int, grain: int | None, sweep: bool) -> None:
    rng = np.random.default_rng(21)
    xs = [rng.standard_normal(20_000).astype(np.float32) for _ in range(3)]
    base = rng.standard_normal(20_000).astype(np.float32)
    u = [np.abs(x - base).view(np.uint32) for x in xs]  # float32 difference, as the kernel
    lo = [[int(np.quantile(v, 0.40)), int(np.quantile(v, 0.97))] for v in u]
    hi = [[int(np.quantile(v, 0.45)), int(v.max())] for v in u]
    bad, above, fill, copies = _mag_copies(xs, base, lo, hi, 20_000, threads, grain)
    assert bad == -1
    for k in range(3):
        for r in range(2):
            want = np.sort(u[k][(u[k] >= lo[k][r]) & (u[k] <= hi[k][r])])
            assert int(above[k, r]) == int((u[k] > hi[k][r]).sum())
            assert int(fill[k, r]) == want.size
            assert np.array_equal(copies[k * 2 + r], want)


def test_magnitude_range_copies_report_overflow(sweep: bool) -> None:
    x = [np.arange(10_000, dtype=np.float32)]
    lo, hi = int(np.float32(100).view(np.uint32)), int(np.float32(5000).view(np.uint32))
    bad, above, fill, copies = _mag_copies(x, None, [[lo]], [[hi]], 1000, threads=2, grain=256)
    assert bad == -1 and int(fill[0, 0]) == 4901 and int(above[0, 0]) == 4999
    assert copies[0].size == 1000  # the first 1000 reserved slots, some of the values in range


def test_mag_select_matches_numpy() -> None:
    from meshmerge.cext import mag_select

    rng = np.random.default_rng(22)
    v = rng.integers(0, 1 << 31, 50_000).astype(np.uint32)
    v[:5000] = 123456  # a run of equal values
    for lo, hi in [(0, (1 << 32) - 1), (100_000, 1 << 30), (123456, 123456)]:
        inr = np.sort(v[(v >= lo) & (v <= hi)])[::-1]
        for need in [1, 2, inr.size // 3, inr.size - 1, inr.size]:
            if need >= 1:
                assert mag_select(v, lo, hi, need) == int(inr[need - 1]), (lo, hi, need)
    with pytest.raises(ValueError, match="fewer than"):
        mag_select(v, 5, 6, 1)
    with pytest.raises(ValueError, match="fewer than"):
        mag_select(v, 0, 10, 0)
    with pytest.raises(ValueError, match="hi must be"):
        mag_select(v, 10, 5, 1)
