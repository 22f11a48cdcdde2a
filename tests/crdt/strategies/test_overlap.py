"""RAM and RAM+ against a numpy reference written here (same float64 operations, so exact)."""

from __future__ import annotations

import numpy as np
import pytest

from meshmerge.cext import overlap_counts, overlap_merge
from meshmerge.crdt.strategies import StrategyError
from meshmerge.crdt.strategies.overlap import reinforcement
from tests.crdt.strategies.helpers import f32, make_input, run, same, storage


def deltas(inp, spec):
    b = f32(inp.base[spec.name], spec.dtype) if inp.kind == "weights" else 0.0
    return b, [f32(t[spec.name], spec.dtype) - b for t in inp.tensors]


def ram_reference(inp, spec, eps, r=None, alpha=None):
    b, ts = deltas(inp, spec)
    nz = [np.abs(t) > eps for t in ts]
    cnt = np.sum(nz, axis=0)
    lam = [1.0] * len(ts)
    if r is not None:
        lam = [reinforcement(int(np.sum(z & (cnt > 1))), int(np.sum(z & (cnt == 1))), r, alpha, eps) for z in nz]
    num = np.zeros(spec.numel)
    den = np.zeros(spec.numel)
    uval = np.zeros(spec.numel)
    for k, t in enumerate(ts):
        num = num + np.where(nz[k], inp.weights[k] * t, 0.0)
        den = den + np.where(nz[k], inp.weights[k], 0.0)
        uval = uval + np.where(nz[k], lam[k] * t, 0.0)
    mean = np.where(cnt > 1, num / np.where(cnt > 1, den, 1.0), 0.0)
    return b + np.where(cnt == 1, uval, mean), cnt


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_ram_matches_reference(dtype: str, kind: str) -> None:
    inp = make_input(4, dtype=dtype, kind=kind)
    out = run("ram", inp, {"epsilon": 0.02})
    seen = set()
    for spec in inp.specs:
        ref, cnt = ram_reference(inp, spec, 0.02)
        seen |= set(np.unique(cnt).tolist())
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()
    assert {0, 1, 2} <= seen  # untouched, sole and shared elements all occur


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_ramplus_matches_reference_and_reinforces_sole_entries(dtype: str) -> None:
    inp = make_input(4, dtype=dtype)
    params = {"epsilon": 0.02, "r": 0.5, "alpha": 3.0}
    out = run("ramplus_tl", inp, params)
    plain = run("ram", inp, {"epsilon": 0.02})
    for spec in inp.specs:
        ref, _ = ram_reference(inp, spec, 0.02, r=0.5, alpha=3.0)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()
        assert not same(out[spec.name], plain[spec.name])


def test_reinforcement_caps_the_ratio() -> None:
    assert reinforcement(0, 10, 0.1, 0.2, 1e-5) == 1.0
    assert reinforcement(1, 10, 0.1, 0.2, 1e-5) == 1.0 + 0.1 * 0.1
    assert reinforcement(10, 0, 0.1, 0.2, 1e-5) == 1.0 + 0.1 * 0.2
    assert reinforcement(10, 0, 0.1, 0.2, 0.0) == 1.0 + 0.1 * 0.2
    assert reinforcement(0, 0, 0.1, 0.2, 0.0) == 1.0


def test_identical_contributions_come_back_and_untouched_elements_keep_the_base() -> None:
    inp = make_input(1)
    same_inp = type(inp)([inp.tensors[0]] * 3, [1.0, 2.0, 3.0], "weights", inp.specs, inp.seed, inp.base)
    for name in ("ram", "ramplus_tl"):
        out = run(name, same_inp, {"epsilon": 0.0})
        for spec in inp.specs:
            assert same(out[spec.name], inp.tensors[0][spec.name])
    huge = run("ram", same_inp, {"epsilon": 1.0})  # nothing contributes
    for spec in inp.specs:
        assert same(huge[spec.name], inp.base[spec.name])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernels_do_not_depend_on_threads(threads: int) -> None:
    rng = np.random.default_rng(3)
    n = 9000
    xs = [(rng.standard_normal(n) * (rng.random(n) < 0.5)).astype(np.float32) for _ in range(5)]
    b = rng.standard_normal(n).astype(np.float32) * 0.0
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    lam = np.array([1.0, 1.1, 1.2, 1.0, 1.05])
    sh, un = np.zeros(5, np.int64), np.zeros(5, np.int64)
    assert overlap_counts(xs, b, 1e-5, sh, un, threads) == -1
    sh1, un1 = np.zeros(5, np.int64), np.zeros(5, np.int64)
    overlap_counts(xs, b, 1e-5, sh1, un1, 1)
    assert sh.tolist() == sh1.tolist() and un.tolist() == un1.tolist()
    assert sh.sum() > 0 and un.sum() > 0
    got, want = np.empty(n, np.float32), np.empty(n, np.float32)
    assert overlap_merge(xs, b, w, lam, 1e-5, got, threads) == -1
    overlap_merge(xs, b, w, lam, 1e-5, want, 1)
    assert got.tobytes() == want.tobytes()


def test_chunk_size_does_not_change_bytes() -> None:
    inp = make_input(5, dtype="BF16")
    for name in ("ram", "ramplus_tl"):
        whole = run(name, inp, {"epsilon": 0.01})
        for chunk in (8, 64, 200):
            part = run(name, inp, {"epsilon": 0.01}, chunk_elements=chunk)
            assert all(same(whole[k], part[k]) for k in whole)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_nan_names_the_contribution(name: str) -> None:
    inp = make_input(3)
    spec = inp.specs[1]
    inp.tensors[2][spec.name].reshape(-1)[5] = np.nan
    with pytest.raises(StrategyError, match="contribution 2 .*NaN or Inf"):
        run(name, inp)


def test_kernel_reports_inf() -> None:
    xs = [np.zeros(100, np.float32) for _ in range(3)]
    xs[1][99] = np.inf
    out = np.empty(100, np.float32)
    assert overlap_merge(xs, None, np.ones(3), np.ones(3), 0.0, out) == 1
    sh, un = np.zeros(3, np.int64), np.zeros(3, np.int64)
    assert overlap_counts(xs, None, 0.0, sh, un) == 1


@pytest.mark.parametrize("bad", [{"epsilon": -1.0}, {"r": float("nan")}, {"alpha": -0.1}, {"gamma": 1}])
def test_bad_params(bad: dict) -> None:
    with pytest.raises(StrategyError):
        run("ramplus_tl", make_input(2), bad)
