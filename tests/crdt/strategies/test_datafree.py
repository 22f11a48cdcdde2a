"""regression_mean, ada_merging and dam against straightforward numpy references."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from meshmerge.cext import LOG_SPAN, abs_log_spans, det_log, using_threads
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput, StrategyError
from meshmerge.crdt.strategies.datafree import AdaParams, RefineParams, entropy, refine
from meshmerge.crdt.tensors import TensorSpec, from_f32
from tests.crdt.strategies.helpers import det_values, f32, make_input, run, same, storage


def with_companions(inp: MergeInput, dtype: str, suffix: str = ".regmean") -> MergeInput:
    """Add a non-negative companion ``<name><suffix>`` to every tensor of every contribution."""
    specs = sorted(
        list(inp.specs) + [TensorSpec(s.name + suffix, dtype, s.shape) for s in inp.specs], key=lambda s: s.name
    )
    tensors = []
    for k, t in enumerate(inp.tensors):
        t = dict(t)
        for s in inp.specs:
            g = np.abs(det_values(f"gram/{k}/{s.name}", s.numel, 2.0))
            t[s.name + suffix] = from_f32(g, dtype).reshape(s.shape)
        tensors.append(t)
    return MergeInput(tensors, inp.weights, inp.kind, specs, inp.seed, inp.base)


# -- regression_mean ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("chunk", [None, 40])
def test_regression_mean_self_weighted_exact(dtype: str, chunk: int | None) -> None:
    inp = make_input(5, dtype=dtype, weights=[1.0, 3.0, 0.5, 2.0, 1.0])
    out = run("regression_mean", inp, {"regularization": 0.05}, **({} if chunk is None else {"chunk_elements": chunk}))
    wn = np.asarray(inp.weights) / math.fsum(inp.weights)
    for s in inp.specs:
        num, den = np.zeros(s.numel), np.zeros(s.numel)
        for k, t in enumerate(inp.tensors):
            x = f32(t[s.name], dtype)
            g = (x * x + 0.05) * wn[k]
            num = num + g * x
            den = den + g
        assert same(out[s.name], storage(num / den, s)), s.name


@pytest.mark.parametrize(("dtype", "gdtype"), [("F32", "F32"), ("BF16", "BF16"), ("F16", "F32")])
@pytest.mark.parametrize("chunk", [None, 40])
def test_regression_mean_with_gram_companions_exact(dtype: str, gdtype: str, chunk: int | None) -> None:
    inp = with_companions(make_input(4, dtype=dtype), gdtype)
    out = run("regression_mean", inp, {}, **({} if chunk is None else {"chunk_elements": chunk}))
    wn = np.asarray(inp.weights) / math.fsum(inp.weights)
    plain = [s for s in inp.specs if not s.name.endswith(".regmean")]
    assert sorted(out) == sorted(s.name for s in inp.specs)
    for s in plain:
        gspec = TensorSpec(s.name + ".regmean", gdtype, s.shape)
        num, den, gs = np.zeros(s.numel), np.zeros(s.numel), np.zeros(s.numel)
        for k, t in enumerate(inp.tensors):
            x = f32(t[s.name], dtype)
            gk = f32(t[gspec.name], gdtype)
            g = (gk + 0.01) * wn[k]
            num = num + g * x
            den = den + g
            gs = gs + gk * wn[k]
        assert same(out[s.name], storage(num / den, s)), s.name
        assert same(out[gspec.name], storage(gs, gspec)), gspec.name


def test_regression_mean_respects_weights() -> None:
    """Weight 2 on a contribution is (up to rounding) the same as giving it twice."""
    inp = make_input(3, weights=[2.0, 1.0, 1.0])
    twice = MergeInput([inp.tensors[0], *inp.tensors], [1.0] * 4, "weights", inp.specs, inp.seed, inp.base)
    a, b = run("regression_mean", inp), run("regression_mean", twice)
    other = run("regression_mean", make_input(3, weights=[1.0, 1.0, 2.0]))
    for s in inp.specs:
        np.testing.assert_allclose(a[s.name], b[s.name], rtol=1e-6, atol=1e-7)
        assert not np.allclose(a[s.name], other[s.name], rtol=1e-6, atol=1e-7)


def test_regression_mean_companion_errors() -> None:
    inp = with_companions(make_input(3), "F32")
    tensors = [dict(t) for t in inp.tensors]
    name = inp.specs[0].name + ".regmean"
    tensors[1][name] = -np.abs(tensors[1][name]) - 1.0
    bad = MergeInput(tensors, inp.weights, inp.kind, inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match=re.escape(f"contribution 1 Gram companion '{name}' must be finite")):
        run("regression_mean", bad)
    partial = MergeInput(inp.tensors, inp.weights, inp.kind, [s for s in inp.specs if s.name != name],
                         inp.seed, inp.base)
    with pytest.raises(StrategyError, match="missing for"):
        run("regression_mean", partial)
    plain = inp.specs[0].name
    orphan = MergeInput(inp.tensors, inp.weights, inp.kind, [s for s in inp.specs if s.name != plain],
                        inp.seed, inp.base)
    with pytest.raises(StrategyError, match="have no tensor to go with"):
        run("regression_mean", orphan)
    with pytest.raises(StrategyError, match=r"regularization must lie in \(0.0"):
        run("regression_mean", inp, {"regularization": 0.0})
    with pytest.raises(StrategyError, match="weight to be > 0"):
        run("regression_mean", make_input(2, weights=[1.0, 0.0]))


# -- the deterministic log and the entropy sums ------------------------------------------------


def test_det_log_is_close_to_libm() -> None:
    xs = [2.0 ** e * m for e in range(-160, 130, 7) for m in (1.0, 1.1, 1.4142135623730951, 1.4142135623730954, 1.9)]
    xs += [5e-324, 1e-310, 0.5, 1.0, 2.0, 3.0, 10.0, 3.4028234663852886e38]
    for x in xs:
        got, want = det_log(x), math.log(x)
        assert abs(got - want) <= 4 * math.ulp(want) + 1e-300, (x, got, want)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            det_log(bad)


def lane_sums(a: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Reference for one span: 8 lanes, each in increasing index, then lanes 0..7 in order."""
    pad = (-a.size) % 8
    a = np.concatenate([a, np.zeros(pad)]).reshape(-1, 8)
    la = np.array([[det_log(v) if v > 0 else 0.0 for v in row] for row in a])
    s1, s2 = np.zeros(8), np.zeros(8)
    for row, lrow in zip(a, la, strict=True):
        s1 = s1 + row
        s2 = s2 + row * lrow
    t1 = t2 = 0.0
    for lane in range(8):
        t1 += s1[lane]
        t2 += s2[lane]
    return t1, t2


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_abs_log_spans_exact(threads: int) -> None:
    n = 2 * LOG_SPAN + 1001
    xs = [det_values(f"span/{k}", n, 3.0) for k in range(3)]
    xs[1][100:300] = 0.0
    b = det_values("span/base", n)
    spans = np.zeros((3, 3, 2))
    with using_threads(threads, grain=8):
        assert abs_log_spans(xs, b, spans) == -1
    for k in range(3):
        a = np.abs(xs[k].astype(np.float64) - b.astype(np.float64))
        for s in range(3):
            assert tuple(spans[k, s]) == lane_sums(a[s * LOG_SPAN:(s + 1) * LOG_SPAN]), (k, s)
        total = math.fsum(spans[k, :, 0].tolist())
        h = entropy(total, math.fsum(spans[k, :, 1].tolist()), n)
        p = a / a.sum()
        nz = p[p > 0]
        assert abs(h - float(-(nz * np.log(nz)).sum())) < 1e-9


def test_abs_log_spans_reports_nonfinite() -> None:
    xs = [det_values(f"nf/{k}", 100) for k in range(3)]
    xs[2][50] = np.inf
    assert abs_log_spans(xs, None, np.zeros((3, 1, 2))) == 2


# -- ada_merging and dam -------------------------------------------------------------------------


def np_refine(g: npt.NDArray[np.float64], m: int, w: npt.NDArray[np.float64], c: npt.NDArray[np.float64],
              steps: int, lr: float, eps: float) -> npt.NDArray[np.float64]:
    for _ in range(steps):
        e = np.maximum(0.0, (c @ g @ c - 2.0 * (g @ c) + np.diag(g)) / m)
        if e.max() == 0.0:
            break
        t = w / (e + eps)
        c = np.maximum(0.0, c + lr * (t / t.sum() - c))
        c = c / c.sum()
    return c


def np_coefficients(inp: MergeInput, name: str, params: dict[str, Any]) -> list[npt.NDArray[np.float64]]:
    """float64 numpy reference: exact Gram (BLAS), entropy with np.log."""
    p: Any = (AdaParams if name == "ada_merging" else RefineParams)(**params)
    w = np.asarray(inp.weights) / sum(inp.weights)
    dtype = inp.specs[0].dtype

    def vecs(s: TensorSpec) -> npt.NDArray[np.float64]:
        rows = [f32(t[s.name], dtype) for t in inp.tensors]
        if inp.kind == "weights" and inp.base is not None:
            b = f32(inp.base[s.name], dtype)
            rows = [(r - b).astype(np.float32).astype(np.float64) for r in rows]
        return np.stack(rows)

    def prior(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        if name != "ada_merging":
            return w
        a = np.abs(v)
        pr = a / a.sum(axis=1, keepdims=True)
        h = np.array([-(q[q > 0] * np.log(q[q > 0])).sum() for q in pr])
        c = w * (h.max() - h + p.entropy_offset)
        return c / c.sum()

    if p.granularity == "task":
        v = np.concatenate([vecs(s) for s in inp.specs], axis=1)
        c = np_refine(v @ v.T, v.shape[1], w, prior(v), p.steps, p.learning_rate, p.epsilon)
        return [c] * len(inp.specs)
    out = []
    for s in inp.specs:
        v = vecs(s)
        out.append(np_refine(v @ v.T, v.shape[1], w, prior(v), p.steps, p.learning_rate, p.epsilon))
    return out


CASES = [
    ("ada_merging", {}),
    ("ada_merging", {"granularity": "layer", "steps": 30, "learning_rate": 0.2}),
    ("dam", {}),
    ("dam", {"granularity": "task", "steps": 200, "learning_rate": 0.05}),
]


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_refined_coefficients_match_numpy(name: str, params: dict[str, Any], kind: str) -> None:
    inp = make_input(5, kind=kind, weights=[1.0, 2.0, 0.5, 1.0, 3.0], spread=0.3)
    strat: Any = strategies.get(name)
    got = strat.coefficients(inp, strat.parse_params(params), 1 << 20)
    want = np_coefficients(inp, name, params)
    for g, ww in zip(got, want, strict=True):
        assert abs(math.fsum(g) - 1.0) < 1e-12
        np.testing.assert_allclose(g, ww, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("name", "params"), CASES)
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_refined_output_is_the_coefficient_combination(name: str, params: dict[str, Any], dtype: str) -> None:
    inp = make_input(4, dtype=dtype, spread=0.3)
    strat: Any = strategies.get(name)
    coefs = strat.coefficients(inp, strat.parse_params(params), 1 << 20)
    out = run(name, inp, params, chunk_elements=64)
    for s, c in zip(inp.specs, coefs, strict=True):
        b = f32(inp.base[s.name], dtype)
        acc = np.zeros(s.numel)
        for k, t in enumerate(inp.tensors):
            acc = acc + c[k] * (f32(t[s.name], dtype) - b)
        assert same(out[s.name], storage(b + acc, s)), s.name


def test_dam_without_steps_is_the_weighted_average() -> None:
    inp = make_input(4, kind="delta", weights=[1.0, 2.0, 3.0, 2.0])
    out = run("dam", inp, {"steps": 0})
    ref = run("linear", inp)
    for s in inp.specs:
        assert same(out[s.name], ref[s.name])


def test_ada_prior_favours_concentrated_magnitudes() -> None:
    """A contribution whose mass sits in a few entries has lower entropy, so more weight."""
    m = 1000
    spread = det_values("spread", m)
    peaked = np.zeros(m, dtype=np.float32)
    peaked[:10] = det_values("peak", 10, 20.0)
    spec = [TensorSpec("w", "F32", (m,))]
    inp = MergeInput([{"w": peaked}, {"w": spread}], [1.0, 1.0], "delta", spec, bytes(32))
    strat: Any = strategies.get("ada_merging")
    (c,) = strat.coefficients(inp, strat.parse_params({"steps": 0}), 1 << 20)
    assert c[0] > 0.9 and c[1] > 0.0


def test_refinement_moves_weight_toward_the_centre() -> None:
    """Contributions the merge already reconstructs well gain weight, outliers lose it; run
    long enough, the coefficients settle on one contribution near the centre."""
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.2], [9.0, 9.0]])
    g = (pts @ pts.T).tolist()
    w = [0.25] * 4
    short = refine(g, 1, w, w, RefineParams(steps=50, learning_rate=0.01))
    assert short[3] < 0.2 and short[3] == min(short)
    assert abs(math.fsum(short) - 1.0) < 1e-12 and min(short) >= 0.0
    long = refine(g, 1, w, w, RefineParams(steps=5000, learning_rate=0.05))
    assert max(long) > 0.999 and long.index(max(long)) != 3


@pytest.mark.parametrize("name", ["ada_merging", "dam"])
def test_permuted_inputs_permute_the_coefficients_exactly(name: str) -> None:
    inp = make_input(4, weights=[1.0, 2.0, 1.0, 3.0], spread=0.2)
    perm = [2, 0, 3, 1]
    p = MergeInput([inp.tensors[k] for k in perm], [inp.weights[k] for k in perm], inp.kind, inp.specs,
                   inp.seed, inp.base)
    strat: Any = strategies.get(name)
    params = strat.parse_params({"steps": 40})
    a = strat.coefficients(inp, params, 1 << 20)
    b = strat.coefficients(p, params, 1 << 20)
    for ca, cb in zip(a, b, strict=True):
        assert [ca[k] for k in perm] == cb


def test_refined_strategies_validate_and_refuse_lora() -> None:
    inp = make_input(3)
    with pytest.raises(StrategyError, match=r"granularity must be one of \['task', 'layer'\]"):
        run("ada_merging", inp, {"granularity": "model"})
    with pytest.raises(StrategyError, match="steps must be an integer"):
        run("dam", inp, {"steps": -1})
    with pytest.raises(StrategyError, match=r"learning_rate must lie in \(0.0, 1.0\]"):
        run("dam", inp, {"learning_rate": 1.5})
    with pytest.raises(StrategyError, match="entropy_offset"):
        run("ada_merging", inp, {"entropy_offset": 0})
    with pytest.raises(StrategyError, match=r"unknown parameter\(s\) \['entropy_offset'\]"):
        run("dam", inp, {"entropy_offset": 1e-6})
    lora = MergeInput(inp.tensors, inp.weights, "lora", inp.specs, inp.seed, inp.base)
    for name in ("ada_merging", "dam", "regression_mean"):
        with pytest.raises(StrategyError, match="does not support 'lora'"):
            run(name, lora)


@pytest.mark.parametrize("name", ["ada_merging", "dam"])
def test_weights_without_base_merge_the_weights(name: str) -> None:
    no_base = make_input(3, with_base=False, spread=0.3)
    strat: Any = strategies.get(name)
    coefs = strat.coefficients(no_base, strat.parse_params({}), 1 << 20)
    out = run(name, no_base)
    for s, c in zip(no_base.specs, coefs, strict=True):
        acc = np.zeros(s.numel)
        for k, t in enumerate(no_base.tensors):
            acc = acc + c[k] * f32(t[s.name], "F32")
        assert same(out[s.name], storage(acc, s))


def test_large_tensors_give_the_same_bytes_for_any_threads_and_chunks() -> None:
    m = 3 * LOG_SPAN + 777
    spec = [TensorSpec("w", "F32", (m,))]
    tensors = [{"w": det_values(f"big/{k}", m)} for k in range(3)]
    inp = MergeInput(tensors, [1.0, 2.0, 1.5], "weights", spec, bytes(32), {"w": det_values("big/b", m)})
    for name in ("regression_mean", "ada_merging", "dam", "representation_surgery", "split_unlearn_merge"):
        with using_threads(1):
            ref = run(name, inp)
        for threads, chunk in ((2, LOG_SPAN), (3, 4096), (2, 1 << 20)):
            with using_threads(threads, grain=1024):
                out = run(name, inp, chunk_elements=chunk)
            assert same(out["w"], ref["w"]), (name, threads, chunk)


# -- representation_surgery ----------------------------------------------------------------------


def np_moments(v: npt.NDArray[np.float64]) -> tuple[float, float]:
    """Mean and variance with moment_lanes' order: lane i mod 8 in increasing i, lanes in order."""
    rows = np.concatenate([v, np.zeros((-v.size) % 8)]).reshape(-1, 8)
    sq, s1 = np.zeros(8), np.zeros(8)
    for row in rows:
        sq = sq + row * row
        s1 = s1 + row
    tq = t1 = 0.0
    for lane in range(8):
        tq += sq[lane]
        t1 += s1[lane]
    mu = t1 / v.size
    return mu, max(0.0, tq / v.size - mu * mu)


@pytest.mark.parametrize("correction", ["rescale", "center"])
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_representation_surgery_exact(correction: str, dtype: str, kind: str) -> None:
    inp = make_input(4, dtype=dtype, kind=kind, weights=[1.0, 2.0, 0.5, 3.0], spread=0.3)
    out = run("representation_surgery", inp, {"correction": correction}, chunk_elements=64)
    w = inp.weights
    total = math.fsum(w)
    wn = [x / total for x in w]
    for s in inp.specs:
        xs = [f32(t[s.name], dtype) for t in inp.tensors]
        acc = np.zeros(s.numel)
        for k, x in enumerate(xs):
            acc = acc + wn[k] * x
        y = acc.astype(np.float32).astype(np.float64)
        mu_m, var_m = np_moments(y)
        stats = [np_moments(x) for x in xs]
        shift = math.fsum([w[k] * (stats[k][0] - mu_m) for k in range(4)]) / total
        scale = 1.0
        if correction == "rescale":
            scale = math.sqrt(math.fsum([w[k] * (stats[k][1] / var_m) for k in range(4)]) / total)
        ref = scale * y + ((mu_m + shift) - scale * mu_m)
        assert same(out[s.name], storage(ref, s)), s.name
        if correction == "rescale":
            got = f32(out[s.name], dtype)
            target = math.fsum([w[k] * stats[k][1] for k in range(4)]) / total
            assert abs(float(got.var()) - target) < 0.02 * target
            if kind == "delta":  # averaging independent deltas shrank the spread; surgery restores it
                assert float(got.var()) > 1.5 * var_m


def test_representation_surgery_constant_tensor_and_errors() -> None:
    spec = [TensorSpec("w", "F32", (100,))]
    tensors = [{"w": np.full(100, v, dtype=np.float32)} for v in (1.0, 3.0)]
    out = run("representation_surgery", MergeInput(tensors, [1.0, 1.0], "delta", spec, bytes(32)))
    assert same(out["w"], np.full(100, 2.0, dtype=np.float32))
    with pytest.raises(StrategyError, match=r"correction must be one of \['rescale', 'center'\]"):
        run("representation_surgery", make_input(2), {"correction": "whiten"})


# -- split_unlearn_merge -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_split_unlearn_merge_exact(method: str, dtype: str, kind: str) -> None:
    from meshmerge.cext import stream_key, uniform_f64
    from meshmerge.crdt.strategies.datafree import SUM_STREAM

    inp = make_input(4, dtype=dtype, kind=kind, weights=[1.0, 2.0, 0.5, 3.0])
    out = run("split_unlearn_merge", inp, {"fraction": 0.3, "method": method}, chunk_elements=64)
    total = math.fsum(inp.weights)
    wn = [x / total for x in inp.weights]
    for s in inp.specs:
        b = f32(inp.base[s.name], dtype) if kind == "weights" else np.zeros(s.numel)
        ts = [f32(t[s.name], dtype) - b for t in inp.tensors]
        acc, score = np.zeros(s.numel), np.zeros(s.numel)
        for k, t in enumerate(ts):
            acc = acc + wn[k] * t
            score = score + np.abs(t) * wn[k]
        if method == "magnitude":
            k = int(s.numel * 0.3)
            reset = score <= np.partition(score, k - 1)[k - 1]
            assert reset.sum() >= k
        else:
            u = np.empty(s.numel)
            uniform_f64(stream_key(inp.seed, s.name, SUM_STREAM), 0, u)
            reset = u < 0.3
        ref = np.where(reset, b + 0.0, b + acc)
        assert same(out[s.name], storage(ref, s)), s.name


def test_split_unlearn_merge_fraction_bounds() -> None:
    inp = make_input(3, kind="delta")
    none = run("split_unlearn_merge", inp, {"fraction": 0.0})
    avg = run("linear", inp)
    everything = run("split_unlearn_merge", inp, {"fraction": 1.0})
    rnd = run("split_unlearn_merge", inp, {"fraction": 1.0, "method": "random"})
    for s in inp.specs:
        assert same(none[s.name], avg[s.name])
        assert not np.any(everything[s.name]) and not np.any(rnd[s.name])
    with pytest.raises(StrategyError, match=r"fraction must lie in \[0.0, 1.0\]"):
        run("split_unlearn_merge", inp, {"fraction": 1.5})
    with pytest.raises(StrategyError, match="method must be one of"):
        run("split_unlearn_merge", inp, {"method": "gradient"})
    with pytest.raises(StrategyError, match="task vectors"):
        run("split_unlearn_merge", make_input(3, with_base=False))


def test_split_unlearn_random_mask_depends_on_the_seed() -> None:
    inp = make_input(3, kind="delta")
    other = MergeInput(inp.tensors, inp.weights, inp.kind, inp.specs, bytes(32), inp.base)
    a = run("split_unlearn_merge", inp, {"method": "random", "fraction": 0.5})
    b = run("split_unlearn_merge", other, {"method": "random", "fraction": 0.5})
    name = inp.specs[-1].name
    assert not same(a[name], b[name])
