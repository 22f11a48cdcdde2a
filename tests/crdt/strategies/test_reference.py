"""Each strategy against a straightforward numpy reference written here.

Exact (byte-equal) where the reference performs the same float64 operations
in the same order; otherwise a documented tolerance: coefficient-space
strategies (SLERP, Karcher, geometric median, centered clipping, FoolsGold,
model stock) are compared with full-vector numpy/libm references at rtol 1e-5
on the float32 result, since their scalar math (detmath, fsum) differs from
libm/BLAS by a few float64 ulp and the iterations amplify that slightly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshmerge.cext import drop_threshold, random_u64, stream_key
from tests.crdt.strategies.helpers import f32, make_input, run, storage

DTYPES = ["F32", "F16", "BF16"]


def deltas(inp, spec):
    b = f32(inp.base[spec.name], spec.dtype) if inp.kind == "weights" else 0.0
    return b, [f32(t[spec.name], spec.dtype) - b for t in inp.tensors]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_exact(dtype: str) -> None:
    inp = make_input(5, dtype=dtype)
    out = run("linear", inp)
    w = np.array(inp.weights) / sum(inp.weights)
    for spec in inp.specs:
        acc = np.zeros(spec.numel)
        for k, t in enumerate(inp.tensors):
            acc = acc + w[k] * f32(t[spec.name], dtype)
        assert out[spec.name].tobytes() == storage(acc, spec).tobytes()


@pytest.mark.parametrize("name,sign", [("task_arithmetic", 1.0), ("negative_merge", -1.0)])
def test_task_arithmetic_exact(name: str, sign: float) -> None:
    inp = make_input(4)
    out = run(name, inp, {"scaling": 0.7})
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        num = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            num = num + inp.weights[k] * t
        ref = b + (sign * 0.7) * (num * 1.0)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()


def ties_reference(inp, spec, density, sign_mode="total", masks=None, rescale=1.0):
    b, ts = deltas(inp, spec)
    n = spec.numel
    vals = []
    for k, t in enumerate(ts):
        v = t.copy()
        if density < 1.0 and masks is None:
            mag = np.abs(t).astype(np.float32)
            r = math.ceil(density * n)
            thr = np.sort(mag)[::-1][r - 1]
            v[mag < thr] = 0.0
        if masks is not None:
            v = np.where(masks[k], v * rescale, 0.0)
        vals.append(v)
    if sign_mode == "total":
        s = np.zeros(n)
        for k, v in enumerate(vals):
            s = s + inp.weights[k] * v
    else:
        s = np.zeros(n)
        for v in vals:
            s = s + np.sign(v)
    num = np.zeros(n)
    den = np.zeros(n)
    for k, v in enumerate(vals):
        agree = ((v > 0) & (s > 0)) | ((v < 0) & (s < 0))
        num = num + np.where(agree, inp.weights[k] * v, 0.0)
        den = den + np.where(agree & (v != 0), inp.weights[k], 0.0)
    mean = np.divide(num, den, out=np.zeros(n), where=den != 0)
    return b + 1.0 * mean


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density,sign_mode", [(0.2, "total"), (0.55, "count"), (1.0, "total")])
@pytest.mark.parametrize("quantize", [False, True])
def test_ties_exact(dtype: str, density: float, sign_mode: str, quantize: bool) -> None:
    inp = make_input(5, dtype=dtype, quantize=quantize)  # quantised: many ties at the threshold
    out = run("ties", inp, {"density": density, "majority_sign": sign_mode})
    for spec in inp.specs:
        ref = ties_reference(inp, spec, density, sign_mode)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes(), spec.name


def keep_scale(density):
    return 65536.0 / (65536 - drop_threshold(1.0 - density))


def dare_masks(inp, spec, density):
    thr = drop_threshold(1.0 - density)
    masks = []
    for k in range(len(inp.tensors)):
        r = np.empty((spec.numel + 3) // 4, dtype=np.uint64)
        random_u64(stream_key(inp.seed, spec.name, k), 0, r)
        lanes = r.view(np.uint16)[: spec.numel]  # little-endian: lane j is bits 16j..16j+15
        masks.append(lanes >= thr)
    return masks


def test_dare_ties_exact() -> None:
    inp = make_input(4, kind="delta")
    out = run("dare_ties", inp, {"density": 0.3})
    for spec in inp.specs:
        ref = ties_reference(inp, spec, 1.0, masks=dare_masks(inp, spec, 0.3), rescale=keep_scale(0.3))
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()


def test_dare_linear_exact_and_keeps_about_density() -> None:
    inp = make_input(3)
    out = run("dare", inp, {"density": 0.25})
    total = sum(inp.weights)
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        masks = dare_masks(inp, spec, 0.25)
        num = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            num = num + inp.weights[k] * np.where(masks[k], t * keep_scale(0.25), 0.0)
        ref = b + 1.0 * (num * (1.0 / total))
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()
    keep = np.concatenate([m for spec in inp.specs for m in dare_masks(inp, spec, 0.25)]).mean()
    assert abs(keep - 0.25) < 0.03


def test_breadcrumbs_exact() -> None:
    inp = make_input(3)
    out = run("breadcrumbs", inp, {"density": 0.6, "gamma": 0.1, "normalize": False})
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        n = spec.numel
        num = np.zeros(n)
        for k, t in enumerate(ts):
            mag = np.abs(t).astype(np.float32)
            desc = np.sort(mag)[::-1]
            removed = math.floor(0.1 * n)
            hi = desc[removed - 1] if removed else np.inf
            lo = desc[min(n, removed + math.ceil(0.6 * n)) - 1]
            num = num + inp.weights[k] * np.where((mag >= lo) & (mag < hi), t, 0.0)
        ref = b + 1.0 * (num * 1.0)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_median_and_trimmed_mean_exact(dtype: str) -> None:
    inp = make_input(6, dtype=dtype)
    med = run("median", inp)
    tm = run("trimmed_mean", inp, {"trim": 0.2})
    for spec in inp.specs:
        stack = np.sort(np.stack([f32(t[spec.name], dtype) for t in inp.tensors]), axis=0)
        assert med[spec.name].tobytes() == storage((stack[2] + stack[3]) * 0.5, spec).tobytes()
        acc = np.zeros(spec.numel)
        for r in range(1, 5):
            acc = acc + stack[r]
        assert tm[spec.name].tobytes() == storage(acc / 4, spec).tobytes()


def whole(inp, vectors):
    """Concatenate per-tensor float64 vectors (spec order) into one model vector."""
    return np.concatenate([vectors[s.name] for s in inp.specs])


def model_vectors(inp):
    use_base = inp.kind == "weights" and inp.base is not None
    out = []
    for k in range(len(inp.tensors)):
        parts = []
        for spec in inp.specs:
            ts = deltas(inp, spec)[1] if use_base else [f32(t[spec.name], spec.dtype) for t in inp.tensors]
            parts.append(ts[k])
        out.append(np.concatenate(parts))
    base = np.concatenate([f32(inp.base[s.name], s.dtype) for s in inp.specs]) if use_base else 0.0
    return np.stack(out), base


def assert_model(inp, out, ref, rtol=1e-5, atol=1e-6):
    got = np.concatenate([out[s.name].astype(np.float64).reshape(-1) for s in inp.specs])
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


def test_krum_and_multi_krum_exact() -> None:
    inp = make_input(7, spread=0.05)
    # Two outliers far away.
    for k in (2, 5):
        for spec in inp.specs:
            inp.tensors[k][spec.name] = inp.tensors[k][spec.name] + np.float32(3.0 * (k - 3))
    x, _ = model_vectors(inp)
    n, f = 7, 2
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[: n - f - 2].sum() for i in range(n)]
    order = np.argsort(scores, kind="stable")
    for name, m in (("krum", 1), ("multi_krum", n - f)):
        out = run(name, inp, {"f": f})
        chosen = sorted(order[:m])
        assert 2 not in chosen and 5 not in chosen
        for spec in inp.specs:
            b, ts = deltas(inp, spec)
            num = np.zeros(spec.numel)
            for k in range(n):
                if k in chosen:
                    num = num + (1.0 / m) * ts[k]
            assert out[spec.name].tobytes() == storage(b + 1.0 * (num * 1.0), spec).tobytes()


def test_geometric_median_matches_weiszfeld() -> None:
    inp = make_input(6)
    out = run("geometric_median", inp, {"iterations": 8})
    x, base = model_vectors(inp)
    z = x.mean(axis=0)
    for _ in range(8):
        d = np.maximum(np.sqrt(((x - z) ** 2).sum(-1)), 1e-6)
        beta = 1.0 / d
        z = (beta[:, None] * x).sum(0) / beta.sum()
    assert_model(inp, out, base + z)


def test_centered_clipping_matches_reference() -> None:
    inp = make_input(5, kind="delta")
    out = run("centered_clipping", inp, {"tau": 0.5, "iterations": 3})
    x, _ = model_vectors(inp)
    v = np.zeros(x.shape[1])
    for _ in range(3):
        d = x - v
        norms = np.sqrt((d**2).sum(-1))
        v = v + (d * np.minimum(1.0, 0.5 / norms)[:, None]).mean(0)
    assert_model(inp, out, v)


def test_foolsgold_matches_reference_and_downweights_clones() -> None:
    inp = make_input(6, kind="delta", spread=0.05)
    for k in (3, 4, 5):  # three Sybil clones of contribution 3 (tiny jitter)
        for spec in inp.specs:
            src = inp.tensors[3][spec.name]
            inp.tensors[k][spec.name] = (src * np.float32(1.0 + 1e-3 * (k - 3))).astype(np.float32)
    out = run("foolsgold", inp)
    x, _ = model_vectors(inp)
    n = 6
    nrm = np.sqrt((x**2).sum(-1))
    cs = (x @ x.T) / np.outer(nrm, nrm)
    np.fill_diagonal(cs, 0.0)
    v = cs.max(1)
    for i in range(n):
        for j in range(n):
            if i != j and v[j] > v[i]:
                cs[i, j] *= v[i] / v[j]
    alpha = np.clip(1.0 - cs.max(1), 0.0, 1.0)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        alpha = np.log(alpha / (1 - alpha)) + 0.5
    alpha[alpha > 1] = 1.0
    alpha[alpha < 0] = 0.0  # includes -inf from log(0)
    assert alpha[3:].max() < 0.05 and alpha[:3].min() > 0.9
    assert_model(inp, out, (alpha[:, None] * x).sum(0) / alpha.sum())


def test_slerp_pair_matches_formula() -> None:
    inp = make_input(2, kind="delta", spread=1.0)
    out = run("slerp", inp, {"t": 0.3})
    for spec in inp.specs:
        a, b = (f32(t[spec.name], spec.dtype) for t in inp.tensors)
        c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        th = np.arccos(c)
        ref = np.sin(0.7 * th) / np.sin(th) * a + np.sin(0.3 * th) / np.sin(th) * b
        np.testing.assert_allclose(out[spec.name].reshape(-1), ref, rtol=1e-5, atol=1e-6)


def karcher_reference(vs, w, steps):
    norms = np.linalg.norm(vs, axis=1)
    u = vs / norms[:, None]
    m = (w[:, None] * u).sum(0)
    m /= np.linalg.norm(m)
    for _ in range(steps):
        c = np.clip(u @ m, -1, 1)
        th = np.arccos(c)
        f = np.where(th == 0, 1.0, th / np.sin(np.where(th == 0, 1.0, th)))
        v = (w[:, None] * f[:, None] * (u - c[:, None] * m)).sum(0)
        vn = np.linalg.norm(v)
        if vn == 0:
            break
        m = np.cos(vn) * m + np.sin(vn) * v / vn
        m /= np.linalg.norm(m)
    return (w * norms).sum() * m


@pytest.mark.parametrize("name,steps", [("karcher", 10), ("multislerp", 1), ("slerp", 10)])
def test_spherical_means_match_reference(name: str, steps: int) -> None:
    inp = make_input(4, kind="delta", spread=1.0)
    out = run(name, inp)
    w = np.array(inp.weights) / sum(inp.weights)
    for spec in inp.specs:
        vs = np.stack([f32(t[spec.name], spec.dtype) for t in inp.tensors])
        ref = karcher_reference(vs, w, steps)
        np.testing.assert_allclose(out[spec.name].reshape(-1), ref, rtol=1e-5, atol=1e-6)


def test_karcher_of_two_equal_norm_inputs_is_slerp() -> None:
    inp = make_input(2, kind="delta", spread=1.0, weights=[1.0, 3.0])
    for spec in inp.specs:
        a, b = inp.tensors[0][spec.name], inp.tensors[1][spec.name]
        inp.tensors[1][spec.name] = (b * (np.linalg.norm(a) / np.linalg.norm(b))).astype(np.float32)
    a = run("karcher", inp, {"steps": 30})
    b = run("slerp", inp)
    for spec in inp.specs:
        np.testing.assert_allclose(a[spec.name], b[spec.name], rtol=1e-5, atol=1e-6)


def test_model_stock_matches_reference() -> None:
    inp = make_input(3, spread=0.05)
    out = run("model_stock", inp)
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        t = np.stack(ts)
        nrm = np.linalg.norm(t, axis=1)
        cos = np.mean([t[i] @ t[j] / (nrm[i] * nrm[j]) for i in range(3) for j in range(i + 1, 3)])
        ratio = 3 * cos / (1 + 2 * cos)
        np.testing.assert_allclose(out[spec.name].reshape(-1), b + ratio * t.mean(0), rtol=1e-5, atol=1e-6)


def test_fisher_merge_exact() -> None:
    inp = make_input(3)
    from meshmerge.crdt.strategies import MergeInput
    from meshmerge.crdt.tensors import TensorSpec

    specs = list(inp.specs) + [TensorSpec(s.name + ".fisher", s.dtype, s.shape) for s in inp.specs]
    specs.sort(key=lambda s: s.name)
    tensors = []
    for k, t in enumerate(inp.tensors):
        t = dict(t)
        for s in inp.specs:
            t[s.name + ".fisher"] = (np.abs(t[s.name]) * np.float32(k + 1)).astype(np.float32)
        tensors.append(t)
    finp = MergeInput(tensors, inp.weights, "weights", specs, inp.seed, inp.base)
    out = run("fisher_merge", finp)
    total = sum(inp.weights)
    for s in inp.specs:
        num = np.zeros(s.numel)
        den = np.zeros(s.numel)
        fs = np.zeros(s.numel)
        for k, t in enumerate(tensors):
            f = t[s.name + ".fisher"].reshape(-1).astype(np.float64)
            fw = (f + 1e-8) * inp.weights[k]
            num += fw * t[s.name].reshape(-1)
            den += fw
            fs += f * inp.weights[k]
        assert out[s.name].tobytes() == (num / den).astype(np.float32).tobytes()
        assert out[s.name + ".fisher"].tobytes() == (fs / total).astype(np.float32).tobytes()


@pytest.mark.parametrize(("dtype", "fdtype"), [("F16", "F16"), ("BF16", "BF16"), ("F32", "BF16"), ("BF16", "F32")])
@pytest.mark.parametrize("chunk", [None, 40])
def test_fisher_merge_exact_in_every_dtype_and_chunking(dtype: str, fdtype: str, chunk: int | None) -> None:
    """16-bit tensors are merged chunk by chunk and F32 ones in one call; a value tensor and
    its Fisher companion of different dtypes must still be walked in the same chunks."""
    from meshmerge.crdt.strategies import MergeInput
    from meshmerge.crdt.tensors import TensorSpec, from_f32

    inp = make_input(5, dtype=dtype)
    specs = list(inp.specs) + [TensorSpec(s.name + ".fisher", fdtype, s.shape) for s in inp.specs]
    specs.sort(key=lambda s: s.name)
    tensors = []
    for k, t in enumerate(inp.tensors):
        t = dict(t)
        for s in inp.specs:
            fisher = np.abs(f32(t[s.name], dtype)).astype(np.float32) * np.float32(k + 1)
            t[s.name + ".fisher"] = from_f32(fisher, fdtype).reshape(s.shape)
        tensors.append(t)
    finp = MergeInput(tensors, inp.weights, "weights", specs, inp.seed, inp.base)
    out = run("fisher_merge", finp, {"epsilon": 1e-3}, **({} if chunk is None else {"chunk_elements": chunk}))
    total = sum(inp.weights)
    for s in inp.specs:
        num, den, fs = np.zeros(s.numel), np.zeros(s.numel), np.zeros(s.numel)
        for k, t in enumerate(tensors):
            f = f32(t[s.name + ".fisher"], fdtype)
            fw = (f + 1e-3) * inp.weights[k]
            num = num + fw * f32(t[s.name], dtype)
            den = den + fw
            fs = fs + f * inp.weights[k]
        fspec = TensorSpec(s.name + ".fisher", fdtype, s.shape)
        assert out[s.name].tobytes() == storage(num / den, s).tobytes()
        assert out[fspec.name].tobytes() == storage(fs / total, fspec).tobytes()


def test_emr_elect_exact() -> None:
    inp = make_input(4)
    out = run("emr", inp, {"scaling": 0.9})
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        total = np.zeros(spec.numel)
        for t in ts:
            total = total + t
        sign = np.sign(total)
        mag = np.zeros(spec.numel)
        for t in ts:
            mag = np.maximum(mag, np.where(t * sign > 0, np.abs(t), 0.0))
        assert out[spec.name].tobytes() == storage(b + 0.9 * (sign * mag), spec).tobytes()


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_keeps_large_entries_more_often_and_matches_reference(name: str) -> None:
    from meshmerge.cext import drop_lanes

    inp = make_input(3)
    density, eps = 0.5, 0.3
    out = run(name, inp, {"density": density, "epsilon": eps})
    w = np.array(inp.weights)
    kept_big = kept_small = 0
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        cols = spec.shape[-1]
        vals = []
        for k, t in enumerate(ts):
            rows = t.reshape(-1, cols)
            ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
            p = np.clip(density + eps * (ranks * (2.0 / (cols - 1)) - 1.0), 0, 1).reshape(-1)
            lanes = np.empty(spec.numel, np.uint16)
            drop_lanes(stream_key(inp.seed, spec.name, k), 0, lanes)
            thr = np.round(p * 65536.0)
            keep = lanes < thr
            kept_big += int(keep[ranks.reshape(-1) >= cols // 2].sum())
            kept_small += int(keep[ranks.reshape(-1) < cols // 2].sum())
            vals.append(np.where(keep, t / (thr / 65536.0), 0.0))
        if name == "della":
            s = np.zeros(spec.numel)
            for k, v in enumerate(vals):
                s = s + w[k] * v
            num = np.zeros(spec.numel)
            den = np.zeros(spec.numel)
            for k, v in enumerate(vals):
                agree = ((v > 0) & (s > 0)) | ((v < 0) & (s < 0))
                num = num + np.where(agree, w[k] * v, 0.0)
                den = den + np.where(agree, w[k], 0.0)
            merged = num / np.where(den == 0, 1.0, den)
        else:
            num = np.zeros(spec.numel)
            for k, v in enumerate(vals):
                num = num + w[k] * v
            merged = num * (1.0 / w.sum())
        assert out[spec.name].tobytes() == storage(b + 1.0 * merged, spec).tobytes()
    assert kept_big > kept_small * 1.3


def test_nearswap_and_passthrough() -> None:
    one = make_input(1)
    out = run("nearswap", one, {"t": 0.01})
    for spec in one.specs:
        b, (t,) = deltas(one, spec)
        x = t + b
        wgt = np.where(t == 0, 1.0, np.minimum(1.0, 0.01 / np.where(t == 0, 1.0, np.abs(t))))
        assert out[spec.name].tobytes() == storage(wgt * x + (1.0 - wgt) * b, spec).tobytes()
    same = run("passthrough", one)
    for spec in one.specs:
        assert same[spec.name].tobytes() == one.tensors[0][spec.name].tobytes()
    with pytest.raises(Exception, match="exactly one contribution"):
        run("passthrough", make_input(2))


def test_led_merge_exact() -> None:
    inp = make_input(5)
    out = run("led_merge", inp)
    w = np.array(inp.weights) / sum(inp.weights)
    for spec in inp.specs:
        xs = [f32(t[spec.name], spec.dtype) for t in inp.tensors]
        mean = np.zeros(spec.numel)
        for k, x in enumerate(xs):
            mean = mean + w[k] * x
        stack = np.stack(xs)
        d = np.abs(stack - mean)
        # closest to the mean; among equals the smallest value
        order = np.lexsort((stack, d), axis=0)[0]
        ref = stack[order, np.arange(spec.numel)]
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()


def test_safe_merge_freezes_the_most_disputed_entries() -> None:
    inp = make_input(4)
    out = run("safe_merge", inp, {"fraction": 0.25})
    w = np.array(inp.weights) / sum(inp.weights)
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        m = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            m = m + w[k] * t
        v = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            v = v + w[k] * ((t - m) * (t - m))
        thr = np.sort(v)[::-1][math.ceil(0.25 * spec.numel) - 1]
        ref = b + np.where((v >= thr) & (v > 0), 0.0, m)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()
        frozen = out[spec.name].reshape(-1) == inp.base[spec.name].reshape(-1)
        assert frozen.mean() >= 0.25


def test_weight_scope_alignment_matches_reference() -> None:
    inp = make_input(3, kind="delta")
    # different scales per contribution
    for k, t in enumerate(inp.tensors):
        for name in list(t):
            t[name] = (t[name] * np.float32(1 + 2 * k) + np.float32(0.1 * k)).astype(np.float32)
    out = run("weight_scope_alignment", inp)
    w = np.array(inp.weights) / sum(inp.weights)
    for spec in inp.specs:
        xs = [f32(t[spec.name], spec.dtype) for t in inp.tensors]
        mus = np.array([x.mean() for x in xs])
        sds = np.array([x.std() for x in xs])
        mu, sd = (w * mus).sum(), (w * sds).sum()
        ref = sum(w[k] * ((xs[k] - mus[k]) * sd / sds[k] + mu) for k in range(3))
        np.testing.assert_allclose(out[spec.name].reshape(-1), ref, rtol=1e-5, atol=1e-6)


def test_sce_exact() -> None:
    inp = make_input(4)
    out = run("sce", inp, {"select_topk": 0.3})
    for spec in inp.specs:
        b, ts = deltas(inp, spec)
        m = np.zeros(spec.numel)
        for t in ts:
            m = m + t
        m = m * (1.0 / 4)
        v = np.zeros(spec.numel)
        for t in ts:
            v = v + (t - m) * (t - m)
        thr = np.sort(v)[::-1][math.ceil(0.3 * spec.numel) - 1]
        sel = v >= thr
        energy = np.array([math.fsum((t[sel] ** 2).tolist()) for t in ts])
        c = energy / math.fsum(energy.tolist())
        s = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            s = s + c[k] * t
        num = np.zeros(spec.numel)
        den = np.zeros(spec.numel)
        for k, t in enumerate(ts):
            agree = sel & (((t > 0) & (s > 0)) | ((t < 0) & (s < 0)))
            num = num + np.where(agree, c[k] * t, 0.0)
            den = den + np.where(agree, c[k], 0.0)
        ref = b + num / np.where(den == 0, 1.0, den)
        assert out[spec.name].tobytes() == storage(ref, spec).tobytes()
