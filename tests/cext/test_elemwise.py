"""DELLA / EMR / Fisher / moment kernels against their definitions, byte for byte."""

import numpy as np
import pytest

from meshmerge.cext import (
    della_merge,
    drop_lanes,
    emr_elect,
    fisher_average,
    kth_smallest_nonnegative,
    moment_lanes,
    safe_freeze,
    safe_moments,
)


def della_reference(
    xs: list[np.ndarray], b: np.ndarray | None, w: np.ndarray, keys: np.ndarray, cols: int, start: int,
    density: float, eps: float, consensus: int, inv_total: float, scaling: float,
) -> np.ndarray:
    bb = b.astype(np.float64) if b is not None else 0.0
    n = xs[0].size
    vals = []
    for k, x in enumerate(xs):
        t = x.astype(np.float64) - bb
        rows = np.abs(t).reshape(-1, cols)
        ranks = np.argsort(np.argsort(rows, axis=1, kind="stable"), axis=1, kind="stable").reshape(-1)
        p = np.full(n, density) if cols == 1 else np.clip(density + eps * (ranks * (2.0 / (cols - 1)) - 1.0), 0, 1)
        lanes = np.empty(n, np.uint16)
        drop_lanes(int(keys[k]), start, lanes)
        thr = np.round(p * 65536.0)
        keep = lanes.astype(np.float64) < thr
        vals.append(np.where(keep, t / np.where(thr > 0, thr / 65536.0, 1.0), 0.0))
    if consensus:
        s = np.zeros(n)
        for k, v in enumerate(vals):
            s = s + (w[k] * v if consensus == 1 else np.sign(v))
        num = np.zeros(n)
        den = np.zeros(n)
        for k, v in enumerate(vals):
            agree = ((v > 0) & (s > 0)) | ((v < 0) & (s < 0))
            num = num + np.where(agree, w[k] * v, 0.0)
            den = den + np.where(agree, w[k], 0.0)
        merged = num / np.where(den == 0.0, 1.0, den)
    else:
        num = np.zeros(n)
        for k, v in enumerate(vals):
            num = num + w[k] * v
        merged = num * inv_total
    with np.errstate(over="ignore"):  # 3e38-sized results round to inf, as in the kernel
        return (bb + scaling * merged).astype(np.float32)


def awkward(rng: np.random.Generator, n: int) -> np.ndarray:
    """Heavy ties, signed zeros, subnormals and magnitudes across the whole float32 range."""
    x = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, 0.5, 1e-42, -1e-42, 3e38, -3e38, 2.0], np.float32), n)
    wide = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    return np.where(rng.random(n) < 0.5, x, wide).astype(np.float32)


@pytest.mark.parametrize("cols", [1, 2, 9, 300, 70_000])  # 70,000: the bucketed (MSD-first) ranking
@pytest.mark.parametrize("consensus", [0, 1, 2])
@pytest.mark.parametrize("with_base", [False, True])
def test_della_matches_reference_with_ties_and_extremes(cols: int, consensus: int, with_base: bool) -> None:
    rng = np.random.default_rng(cols * 10 + consensus)
    n, nk = cols * (7 if cols < 1000 else 2), 5
    xs = [awkward(rng, n) for _ in range(nk)]
    xs[1] = xs[0].copy()  # identical magnitudes across contributors too
    b = rng.standard_normal(n).astype(np.float32) if with_base else None
    w = rng.uniform(0.5, 2.0, nk)
    keys = np.array([11, 2**63 + 5, 7, 123456789, 42], np.uint64)
    want = della_reference(xs, b, w, keys, cols, 96, 0.45, 0.35, consensus, 1.0 / w.sum(), 0.8)
    for threads in (1, 2, 3):
        got = np.empty(n, np.float32)
        della_merge(xs, b, w, keys, cols, 96, 0.45, 0.35, consensus, 1.0 / w.sum(), 0.8, got, threads)
        assert got.tobytes() == want.tobytes()


def test_della_rejects_partial_rows() -> None:
    xs = [np.ones(10, np.float32)]
    with pytest.raises(ValueError, match="whole rows"):
        della_merge(xs, None, np.ones(1), np.zeros(1, np.uint64), 3, 0, 0.5, 0.1, 1, 1.0, 1.0,
                    np.empty(10, np.float32))


@pytest.mark.parametrize("nk", [1, 4, 7, 16])
@pytest.mark.parametrize("with_base", [False, True])
def test_emr_matches_reference(with_base: bool, nk: int) -> None:
    rng = np.random.default_rng(5 + nk)
    n = 5000
    xs = [awkward(rng, n) for _ in range(nk)]
    b = awkward(rng, n) if with_base else None
    bb = b.astype(np.float64) if b is not None else 0.0
    ts = [x.astype(np.float64) - bb for x in xs]
    total = np.zeros(n)
    for t in ts:
        total = total + t
    sign = np.sign(total)
    mag = np.zeros(n)
    for t in ts:
        mag = np.maximum(mag, np.where(t * sign > 0, np.abs(t), 0.0))
    with np.errstate(over="ignore"):
        want = (bb + 0.9 * (sign * mag)).astype(np.float32)
    for threads in (1, 2):
        got = np.empty(n, np.float32)
        emr_elect(xs, b, 0.9, got, threads)
        assert got.tobytes() == want.tobytes()


def test_fisher_reports_first_bad_contributor_fisher_before_values() -> None:
    n = 3000
    xs = [np.ones(n, np.float32) for _ in range(3)]
    fs = [np.ones(n, np.float32) for _ in range(3)]
    out, fout = np.empty(n, np.float32), np.empty(n, np.float32)
    w = np.ones(3)
    assert fisher_average(xs, fs, w, 1e-8, 3.0, out, fout) == (-1, 0)
    xs[2][2999] = np.nan
    assert fisher_average(xs, fs, w, 1e-8, 3.0, out, fout) == (2, 1)
    fs[2][5] = -1.0
    assert fisher_average(xs, fs, w, 1e-8, 3.0, out, fout) == (2, 0)
    fs[1][100] = np.inf
    assert fisher_average(xs, fs, w, 1e-8, 3.0, out, fout, 2) == (1, 0)


def fisher_reference(
    xs: list[np.ndarray], fs: list[np.ndarray], w: np.ndarray, eps: float, total: float
) -> tuple[np.ndarray, np.ndarray]:
    n = xs[0].size
    num, den, fsum = np.zeros(n), np.zeros(n), np.zeros(n)
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(len(xs)):
            f = fs[k].astype(np.float64)
            fw = (f + eps) * w[k]
            num = num + fw * xs[k].astype(np.float64)
            den = den + fw
            fsum = fsum + f * w[k]
        return (num / den).astype(np.float32), (fsum / total).astype(np.float32)


# 1 << 20 elements and more take the streaming-store path; + 4099 leaves a partial block
@pytest.mark.parametrize("nk", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("n", [5000, (1 << 20) + 4099])
def test_fisher_matches_reference_for_any_grouping_and_threads(nk: int, n: int) -> None:
    rng = np.random.default_rng(nk * 7 + n)
    xs = [awkward(rng, n) for _ in range(nk)]
    fs = [np.abs(awkward(rng, n)) for _ in range(nk)]
    fs[0][::5] = -0.0  # a negative zero is a valid Fisher value
    w = rng.uniform(0.1, 3.0, nk)
    want, fwant = fisher_reference(xs, fs, w, 1e-8, float(w.sum()))
    for threads in (1, 2):
        # out[1:] is not 16-byte aligned: the streaming stores start after a scalar prologue
        out, fout = np.empty(n + 1, np.float32), np.empty(n + 1, np.float32)
        assert fisher_average(xs, fs, w, 1e-8, float(w.sum()), out[1:], fout[1:], threads) == (-1, 0)
        assert out[1:].tobytes() == want.tobytes()
        assert fout[1:].tobytes() == fwant.tobytes()


@pytest.mark.parametrize("k", [0, 2, 4, 6])
def test_fisher_finds_bad_inputs_in_any_sweep_and_block(k: int) -> None:
    n, nk = (1 << 20) + 77, 7  # k 0-3: first sweep of four, 4-6: the single-input tail
    xs = [np.full(n, 0.5, np.float32) for _ in range(nk)]
    fs = [np.full(n, 2.0, np.float32) for _ in range(nk)]
    w = np.ones(nk)
    out, fout = np.empty(n, np.float32), np.empty(n, np.float32)
    for i, bad in enumerate([np.inf, -np.inf, np.nan]):
        xs[k][n - 1 - i] = bad
        assert fisher_average(xs, fs, w, 1e-8, 7.0, out, fout, 2) == (k, 1)
        xs[k][n - 1 - i] = 0.5
        fs[k][700_000 + i] = bad
        assert fisher_average(xs, fs, w, 1e-8, 7.0, out, fout, 2) == (k, 0)
        fs[k][700_000 + i] = 2.0
    fs[k][123_456] = -1e-30
    assert fisher_average(xs, fs, w, 1e-8, 7.0, out, fout, 1) == (k, 0)
    fs[k][123_456] = -0.0
    assert fisher_average(xs, fs, w, 1e-8, 7.0, out, fout, 1) == (-1, 0)


@pytest.mark.parametrize("start", [0, 3, 8, 13])
def test_moment_lanes_are_sequential_float64_lane_sums(start: int) -> None:
    rng = np.random.default_rng(start)
    xs = [awkward(rng, 1001) for _ in range(3)]
    xs[2] = (rng.standard_normal(1001) * 3).astype(np.float32)
    lanes = np.zeros((3, 2, 8))
    for lo, hi in ((0, 5), (5, 600), (600, 1001)):  # chunked, starting at start + lo
        assert moment_lanes([x[lo:hi] for x in xs], start + lo, lanes, 2) == -1
    lane_of = (start + np.arange(1001)) % 8
    for k, x in enumerate(xs):
        v = x.astype(np.float64)
        for lane in range(8):
            sel = v[lane_of == lane]
            sq = np.cumsum(sel * sel)[-1] if sel.size else 0.0  # cumsum adds in order
            s1 = np.cumsum(sel)[-1] if sel.size else 0.0
            assert lanes[k, 0, lane] == sq and lanes[k, 1, lane] == s1
    xs[1][1000] = np.nan
    assert moment_lanes(xs, start, np.zeros((3, 2, 8))) == 1


@pytest.mark.parametrize("with_base", [False, True])
def test_safe_moments_and_freeze_match_their_numpy_definition(with_base: bool) -> None:
    rng = np.random.default_rng(11)
    n = 70_001
    xs = [awkward(rng, n) for _ in range(5)]
    base = awkward(rng, n) if with_base else None
    wn = np.array([0.1, 0.3, 0.2, 0.25, 0.15])
    bb = base.astype(np.float64) if base is not None else 0.0
    ts = [x.astype(np.float64) - bb for x in xs]
    m = np.zeros(n)
    for k, t in enumerate(ts):
        m = m + wn[k] * t
    v = np.zeros(n)
    for k, t in enumerate(ts):
        v = v + wn[k] * ((t - m) * (t - m))
    thr = float(np.sort(v)[n // 2])
    b0 = base.astype(np.float64) if base is not None else np.zeros(n)
    ref = (b0 + np.where((v >= thr) & (v > 0.0), 0.0, m)).astype(np.float32)
    for threads in (1, 2, 3):
        var, out = np.empty(n), np.empty(n, np.float32)
        assert safe_moments(xs, base, wn, var, out, threads) == -1
        assert var.tobytes() == v.tobytes()
        safe_freeze(var, thr, base, out)
        assert out.tobytes() == ref.tobytes()
    xs[3][n - 1] = np.inf
    assert safe_moments(xs, base, wn, np.empty(n), np.empty(n, np.float32)) == 3


def test_safe_freeze_keeps_base_plus_zero_and_never_freezes_zero_variance() -> None:
    out = np.full(4, 7.0, np.float32)
    safe_freeze(np.array([1.0, 1.0, 0.0, 0.5]), 0.0, np.array([-0.0, 2.0, 3.0, -1.0], np.float32), out)
    assert out.tolist() == [0.0, 2.0, 7.0, -1.0] and not np.signbit(out[0])
    safe_freeze(np.array([1.0, 1.0, 0.0, 0.5]), 0.75, None, out)
    assert out.tolist() == [0.0, 0.0, 7.0, -1.0]


def test_kth_smallest_nonnegative_equals_numpy_partition() -> None:
    rng = np.random.default_rng(3)
    cases = [
        rng.random(100_000) ** 8,
        np.zeros(5_000),
        np.full(7_000, 3.5),
        np.where(rng.random(20_000) < 0.9, 0.25, rng.random(20_000)),
        rng.integers(0, 3, 10_000) * 1e-300,  # subnormals and zeros
        np.array([5.0]),
        np.array([np.inf, 1.0, 0.0, 1e308]),
    ]
    for v in cases:
        for k in sorted({0, v.size - 1, v.size // 2, v.size // 10, max(0, v.size - 7)}):
            assert kth_smallest_nonnegative(v, k) == np.partition(v, k)[k], (v[:3], k)
    with pytest.raises(ValueError, match="k must be"):
        kth_smallest_nonnegative(np.ones(3), 3)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_emr_reports_first_contributor_with_nan_or_inf(threads: int) -> None:
    n = 5000
    xs = [np.full(n, 0.5, np.float32) for _ in range(5)]
    xs[3][4321] = np.inf
    xs[1][17] = np.nan
    out = np.empty(n, np.float32)
    assert emr_elect(xs, None, 1.0, out, threads) == 1
    xs[1][17] = 0.0
    assert emr_elect(xs, None, 1.0, out, threads) == 3
    xs[3][4321] = 0.0
    assert emr_elect(xs, np.zeros(n, np.float32), 1.0, out, threads) == -1
    assert np.all(out == 0.5)
