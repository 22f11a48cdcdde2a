"""Arcee Fusion: our exp/log, the KL rows and the fused output against numpy/libm references."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from meshmerge.cext import using_threads
from meshmerge.cext.datafree import det_log
from meshmerge.cext.fusion import det_exp, softmax_kl_rows
from meshmerge.crdt.strategies import MergeInput, StrategyError
from meshmerge.crdt.strategies.fusion import fusion_threshold
from meshmerge.crdt.tensors import TensorSpec
from tests.crdt.strategies.helpers import f32, make_input, run, same

ULP = 2.0**-52

# sha256 over (name, bytes) of every output tensor of make_input(1, dtype, tag="golden").
GOLDEN = {
    "F32": "7e7c1022ecd476e824d520393523004dfabdbc9fea80cb5973aae2011d134f0c",
    "F16": "e8f671686306da1c4637c6dcd46020792b077c6746bfdb2e9843758e97b8977d",
    "BF16": "ecbd8757c82190a9251f672f3f6b45ffa36a8f89e2f5331955a3249ff5d08168",
}


def test_exp_and_log_are_within_a_few_ulp_of_libm() -> None:
    xs = np.concatenate([-np.logspace(-300, math.log10(745.0), 3000), [-0.0, -1e-300, -708.5, -744.0]])
    for x in xs:
        want = math.exp(float(x))
        if want > 1e-300:
            assert abs(det_exp(float(x)) - want) <= 2 * ULP * want
    assert det_exp(-800.0) == 0.0
    for y in np.concatenate([np.logspace(-307, 307, 3000), [1.0, 2.0, 0.5, 5e-324, 1.7e308]]):
        want = math.log(float(y))
        assert abs(det_log(float(y)) - want) <= 4 * ULP * max(abs(want), 1e-300) or abs(want) < 1e-15
    assert det_log(1.0) == 0.0
    with pytest.raises(ValueError):
        det_log(0.0)


def kl_reference(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    x64, b64 = x.astype(np.float64), b.astype(np.float64)
    p = np.exp(x64 - x64.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True) + 1e-8
    q = np.exp(b64 - b64.max(axis=1, keepdims=True))
    q = q / q.sum(axis=1, keepdims=True) + 1e-8
    return (p * np.log(p / q)).sum(axis=1)


@pytest.mark.parametrize("cols", [1, 7, 4096, 10_000])
def test_kl_rows_match_numpy_and_ignore_threads(cols: int) -> None:
    rng = np.random.default_rng(cols)
    rows = max(1, 20_000 // cols)
    x = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    b = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    got = softmax_kl_rows(x, b, 1)
    np.testing.assert_allclose(got, kl_reference(x, b), rtol=1e-10, atol=1e-15)
    for t in (2, 3):
        assert softmax_kl_rows(x, b, t).tobytes() == got.tobytes()


def test_threshold_uses_exact_order_statistics() -> None:
    v = np.arange(101, dtype=np.float64)[::-1].copy()
    assert fusion_threshold(v) == 50.0 + 1.5 * (75.0 - 25.0)
    assert fusion_threshold(np.array([3.0])) == 3.0


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_fusion_matches_reference(dtype: str) -> None:
    inp = make_input(1, dtype=dtype, spread=0.5)
    out = run("arcee_fusion", inp)
    kept_any = dropped_any = False
    for spec in inp.specs:
        x = f32(inp.tensors[0][spec.name], dtype).astype(np.float32)
        b = f32(inp.base[spec.name], dtype).astype(np.float32)
        cols = spec.shape[-1]
        kl = kl_reference(x.reshape(-1, cols), b.reshape(-1, cols))
        s = (np.abs(x.astype(np.float64) - b) .reshape(-1, cols) * kl[:, None]).reshape(-1)
        srt = np.sort(s)
        n = s.size
        thr = srt[(n - 1) // 2] + 1.5 * (srt[3 * (n - 1) // 4] - srt[(n - 1) // 4])
        keep = s >= thr
        want = np.where(keep, inp.tensors[0][spec.name].reshape(-1), inp.base[spec.name].reshape(-1))
        assert same(out[spec.name], want.reshape(spec.shape))
        kept_any |= bool(keep.any())
        dropped_any |= bool((~keep).any())
    assert kept_any and dropped_any


def test_fusion_golden_and_thread_independent() -> None:
    for dtype, want in GOLDEN.items():
        inp = make_input(1, dtype=dtype, tag="golden", spread=0.5)
        digests = set()
        for t in (1, 2, 3):
            with using_threads(t):
                out = run("arcee_fusion", inp)
            h = hashlib.sha256()
            for spec in inp.specs:
                h.update(spec.name.encode() + b"\0" + out[spec.name].tobytes())
            digests.add(h.hexdigest())
        assert digests == {want}, (dtype, digests)


def test_fusion_needs_exactly_one_weights_contribution_and_finite_values() -> None:
    with pytest.raises(StrategyError, match="exactly one contribution"):
        run("arcee_fusion", make_input(2))
    with pytest.raises(StrategyError, match="does not support 'delta'"):
        run("arcee_fusion", make_input(1, kind="delta"))
    with pytest.raises(StrategyError, match="needs the base model"):
        run("arcee_fusion", make_input(1, with_base=False))
    inp = make_input(1)
    inp.tensors[0][inp.specs[0].name].reshape(-1)[3] = np.inf
    with pytest.raises(StrategyError, match="contribution 0 .*NaN or Inf"):
        run("arcee_fusion", inp)


def test_fusion_of_a_large_one_row_tensor() -> None:
    m = 50_000
    rng = np.random.default_rng(9)
    b = rng.standard_normal(m).astype(np.float32)
    x = (b + rng.standard_normal(m).astype(np.float32) * np.float32(0.1)).astype(np.float32)
    spec = [TensorSpec("w", "F32", (m,))]
    out = run("arcee_fusion", MergeInput([{"w": x}], [1.0], "weights", spec, bytes(32), {"w": b}))["w"]
    kept = out == x
    assert np.all(kept | (out == b))
    assert 0 < kept.sum() < m
