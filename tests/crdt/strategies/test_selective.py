"""sce, nearswap and led_merge (Cython kernels) against their numpy definitions, byte for byte.

The references below are the numpy formulations the strategies were first
written in (float64 temporaries, contributors in order). One deliberate
difference for sce: each contribution's energy is the exact sum of its
squares over the whole tensor, rounded once (``math.fsum`` of all of them);
the first numpy version rounded once per chunk, so its energies could depend
on the chunk size.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest

from meshmerge.cext import using_threads
from meshmerge.crdt.strategies import MergeInput, StrategyError
from meshmerge.crdt.tensors import TensorSpec, from_f32, to_f32
from tests.crdt.strategies.helpers import make_input, run

SHAPES = {"a": (300, 70), "b": (1,), "c": (5003,)}


def awkward_input(n: int, dtype: str, kind: str, seed: int, ident: bool = False) -> MergeInput:
    """Contributions with ties, values equal to the base, signed zeros, wide magnitudes.

    ``ident``: every contribution equals the first (zero variance everywhere)."""
    rng = np.random.default_rng(seed)
    specs = [TensorSpec(name, dtype, shape) for name, shape in sorted(SHAPES.items())]
    base: dict[str, Any] = {}
    tensors: list[dict[str, Any]] = [{} for _ in range(n)]
    for s in specs:
        b = rng.standard_normal(s.numel).astype(np.float32)
        base[s.name] = from_f32(b, dtype).reshape(s.shape)
        bw = to_f32(base[s.name].reshape(-1), dtype)
        for k in range(n):
            d = (rng.standard_normal(s.numel) * 10.0 ** rng.integers(-6, 2, s.numel)).astype(np.float32)
            d = np.where(rng.random(s.numel) < 0.1, np.float32(0.0), d)
            d = np.where(rng.random(s.numel) < 0.05, np.float32(-0.0), d)
            d = np.where(rng.random(s.numel) < 0.05, np.float32(2.0 ** -20), d)
            if k > 0 and (k == 1 or ident):
                tensors[k][s.name] = tensors[0][s.name].copy()
                continue
            v = (bw + d if kind == "weights" else d).astype(np.float32)
            tensors[k][s.name] = from_f32(v, dtype).reshape(s.shape)
    weights = [1.0 + 0.5 * k for k in range(n)]
    return MergeInput(tensors, weights, kind, specs, bytes(32), base)


def widened(inp: MergeInput, spec: TensorSpec) -> tuple[Any, list[np.ndarray]]:
    xs = [to_f32(np.asarray(t[spec.name]), spec.dtype).astype(np.float64).reshape(-1) for t in inp.tensors]
    if inp.kind == "delta":
        return 0.0, xs
    return to_f32(np.asarray(inp.base[spec.name]), spec.dtype).astype(np.float64).reshape(-1), xs


def storage(ref: np.ndarray, spec: TensorSpec) -> np.ndarray:
    with np.errstate(over="ignore"):
        return from_f32(np.asarray(ref).astype(np.float32), spec.dtype).reshape(spec.shape)


def sce_reference(inp: MergeInput, spec: TensorSpec, topk: float) -> np.ndarray:
    b, xs = widened(inp, spec)
    ts = [x - b for x in xs]
    n = len(ts)
    m = np.zeros(spec.numel)
    for t in ts:
        m = m + t
    m = m * (1.0 / n)
    var = np.zeros(spec.numel)
    for t in ts:
        var = var + (t - m) * (t - m)
    keep = math.ceil(topk * spec.numel)
    thr = np.partition(var, spec.numel - keep)[spec.numel - keep] if 0 < keep < spec.numel else -1.0
    sel = var >= thr
    energy = [math.fsum(np.where(sel, t * t, 0.0).tolist()) for t in ts]
    total = math.fsum(energy)
    c = [e / total if total > 0.0 else 1.0 / n for e in energy]
    s = np.zeros(spec.numel)
    for k, t in enumerate(ts):
        s = s + c[k] * t
    num = np.zeros(spec.numel)
    den = np.zeros(spec.numel)
    for k, t in enumerate(ts):
        agree = sel & (((t > 0) & (s > 0)) | ((t < 0) & (s < 0)))
        num = num + np.where(agree, c[k] * t, 0.0)
        den = den + np.where(agree, c[k], 0.0)
    return storage(b + num / np.where(den == 0.0, 1.0, den), spec)


def nearswap_reference(inp: MergeInput, spec: TensorSpec, t: float) -> np.ndarray:
    b, (x,) = widened(inp, spec)
    d = x - b
    dist = np.abs(d)
    wgt = np.where(dist == 0.0, 1.0, np.minimum(1.0, t / np.where(dist == 0.0, 1.0, dist)))
    return storage(wgt * (d + b) + (1.0 - wgt) * b, spec)


def led_reference(inp: MergeInput, spec: TensorSpec) -> np.ndarray:
    w = np.array(inp.weights, dtype=np.float64)
    wn = w / float(w.sum())
    _b, xs = widened(inp, spec)
    mean = np.zeros(spec.numel)
    for k, x in enumerate(xs):
        mean = mean + wn[k] * x
    best = xs[0].copy()
    dist = np.abs(best - mean)
    for x in xs[1:]:
        d = np.abs(x - mean)
        better = (d < dist) | ((d == dist) & (x < best))
        best = np.where(better, x, best)
        dist = np.where(better, d, dist)
    return storage(best, spec)


def same_bytes(out: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    for name, ref in want.items():
        got = np.asarray(out[name])
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert got.tobytes() == ref.tobytes(), name


def every_split(name: str, inp: MergeInput, params: dict[str, Any], want: dict[str, np.ndarray]) -> None:
    """The strategy gives ``want`` for 1, 2 and 3 threads (small grain: many blocks) and any chunk size."""
    for threads, chunk in ((1, None), (2, 4096), (3, 1000), (2, 8)):
        with using_threads(threads, grain=1024):
            same_bytes(run(name, inp, params, chunk_elements=chunk), want)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
@pytest.mark.parametrize("topk", [1.0, 0.37, 1e-4])
def test_sce_matches_numpy_definition(dtype: str, kind: str, topk: float) -> None:
    inp = awkward_input(5, dtype, kind, seed=len(dtype) + 10 * len(kind))
    want = {s.name: sce_reference(inp, s, topk) for s in inp.specs}
    every_split("sce", inp, {"select_topk": topk}, want)


def test_sce_identical_contributions_and_two_inputs() -> None:
    ident = awkward_input(3, "F32", "weights", seed=3, ident=True)
    want = {s.name: sce_reference(ident, s, 0.5) for s in ident.specs}
    every_split("sce", ident, {"select_topk": 0.5}, want)
    for s in ident.specs:  # zero variance everywhere: every entry is selected and x comes back
        assert want[s.name].tobytes() == np.asarray(ident.tensors[0][s.name]).tobytes()
    two = awkward_input(2, "BF16", "delta", seed=4)
    every_split("sce", two, {"select_topk": 0.5}, {s.name: sce_reference(two, s, 0.5) for s in two.specs})


def test_sce_needs_two_contributions() -> None:
    with pytest.raises(StrategyError, match="at least 2 contributions, got 1"):
        run("sce", make_input(1))


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("t", [1e-3, 0.5, 1e30])
def test_nearswap_matches_numpy_definition(dtype: str, t: float) -> None:
    inp = awkward_input(1, dtype, "weights", seed=7 + len(dtype))
    want = {s.name: nearswap_reference(inp, s, t) for s in inp.specs}
    every_split("nearswap", inp, {"t": t}, want)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_led_merge_matches_numpy_definition(dtype: str, kind: str) -> None:
    inp = awkward_input(6, dtype, kind, seed=11 + len(dtype))
    want = {s.name: led_reference(inp, s) for s in inp.specs}
    every_split("led_merge", inp, {}, want)


def poisoned(inp: MergeInput, k: int | None, name: str, at: int, bad: float) -> MergeInput:
    """``inp`` with element ``at`` of tensor ``name`` of contribution k (None: the base) set to ``bad``."""
    tensors = [dict(t) for t in inp.tensors]
    base = dict(inp.base)
    src = base if k is None else tensors[k]
    spec = next(s for s in inp.specs if s.name == name)
    arr = to_f32(np.asarray(src[name]).reshape(-1), spec.dtype).copy()
    arr[at] = bad
    src[name] = from_f32(arr, spec.dtype).reshape(spec.shape)
    return MergeInput(tensors, inp.weights, inp.kind, inp.specs, inp.seed, base)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name,n,params", [
    ("sce", 4, {"select_topk": 1.0}),
    ("sce", 4, {"select_topk": 0.3}),
    ("led_merge", 4, {}),
    ("nearswap", 1, {}),
])
def test_nonfinite_input_names_the_contribution(dtype: str, bad: float, name: str, n: int,
                                                 params: dict[str, Any]) -> None:
    inp = awkward_input(n, dtype, "weights", seed=5)
    k = n - 1
    msg = re.escape(f"contribution {k} tensor 'a' holds NaN or Inf")
    for threads in (1, 3):
        with using_threads(threads, grain=1024), pytest.raises(StrategyError, match=msg):
            run(name, poisoned(inp, k, "a", 20_999, bad), params, chunk_elements=4096)
    if name in ("sce", "nearswap"):
        with pytest.raises(StrategyError, match="base model tensor 'c' holds NaN or Inf"):
            run(name, poisoned(inp, None, "c", 5002, bad), params)
