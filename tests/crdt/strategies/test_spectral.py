"""Spectral strategies (star, adarank, svd_knot_tying, dual_projection) against numpy/LAPACK.

The references use ``np.linalg.svd`` on the task matrices directly; ours goes
through the Gram matrix and the Jacobi eigensolver, so results agree to a
tolerance, not bytes: ``atol = 1e-5 * max|reference delta|`` on the float32
result (the Gram route squares the condition number, and the truncated
subspaces are accurate to about ``1e-16 * s_1^2 / gap``; the test matrices
have gaps far above that).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshmerge.cext import using_threads
from meshmerge.crdt.strategies import MergeInput, StrategyError
from meshmerge.crdt.strategies.spectral import MAX_RANK
from meshmerge.crdt.tensors import TensorSpec, from_f32, to_f32
from tests.crdt.strategies.cases import RUNNABLE
from tests.crdt.strategies.helpers import f32, make_input, run, same

NAMES = ["star", "adarank", "svd_knot_tying", "dual_projection"]


def task_matrices(inp: MergeInput, spec: TensorSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    b = f32(inp.base[spec.name], spec.dtype) if inp.kind == "weights" else np.zeros(spec.numel)
    rows = spec.shape[0] if len(spec.shape) >= 2 else 1
    ds = [(f32(t[spec.name], spec.dtype) - b).reshape(rows, -1) for t in inp.tensors]
    return b, ds


def unit(inp: MergeInput) -> np.ndarray:
    w = np.array(inp.weights, dtype=np.float64)
    return w / w.sum()


def check(out: dict, inp: MergeInput, refs: dict[str, np.ndarray]) -> None:
    for spec in inp.specs:
        b, _ = task_matrices(inp, spec)
        delta = refs[spec.name].reshape(-1)
        got = to_f32(out[spec.name], spec.dtype).astype(np.float64).reshape(-1)
        want = b + delta
        # float32 (or 16-bit) storage rounding of the result, plus the documented tolerance
        ulp = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}[spec.dtype]
        tol = 1e-5 * np.max(np.abs(delta), initial=0.0) + ulp * np.abs(want) + 1e-30
        assert np.all(np.abs(got - want) <= tol), (spec.name, np.max(np.abs(got - want)))


def truncate(d: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vt[:k], s


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("kind", ["weights", "delta"])
@pytest.mark.parametrize("rescale", ["energy", "nuclear", "none"])
def test_star_matches_numpy_svd(dtype: str, kind: str, rescale: str) -> None:
    inp = make_input(5, dtype=dtype, kind=kind)
    out = run("star", inp, {"rank_fraction": 0.5, "rescale": rescale})
    w = unit(inp)
    refs = {}
    for spec in inp.specs:
        _, ds = task_matrices(inp, spec)
        acc = np.zeros_like(ds[0])
        for wk, d in zip(w, ds, strict=True):
            k = max(1, math.floor(0.5 * min(d.shape)))
            t, s = truncate(d, k)
            factor = {"energy": math.sqrt(np.sum(s**2) / np.sum(s[:k] ** 2)),
                      "nuclear": np.sum(s) / np.sum(s[:k]), "none": 1.0}[rescale]
            acc = acc + wk * factor * t
        refs[spec.name] = acc
    check(out, inp, refs)


@pytest.mark.parametrize("params", [{"energy": 0.6}, {"energy": 0.95}, {"target_rank": 2}])
def test_adarank_matches_numpy_svd(params: dict) -> None:
    inp = make_input(4)
    out = run("adarank", inp, params)
    w = unit(inp)
    refs = {}
    for spec in inp.specs:
        _, ds = task_matrices(inp, spec)
        acc = np.zeros_like(ds[0])
        for wk, d in zip(w, ds, strict=True):
            s = np.linalg.svd(d, compute_uv=False)
            if "target_rank" in params:
                k = min(params["target_rank"], len(s))
            else:
                cum = np.cumsum(s**2) / np.sum(s**2)
                k = int(np.argmax(cum >= params["energy"] - 1e-12)) + 1
            acc = acc + wk * truncate(d, k)[0]
        refs[spec.name] = acc
    check(out, inp, refs)


def np_ties(vs: list[np.ndarray], w: np.ndarray, density: float) -> np.ndarray:
    trimmed = []
    for v in vs:
        keep = max(1, math.ceil(density * v.size))
        thresh = np.sort(np.abs(v).reshape(-1))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(v) >= thresh, v, 0.0))
    sign = np.sign(sum(wk * v for wk, v in zip(w, trimmed, strict=True)))
    num = sum(np.where((np.sign(v) == sign) & (v != 0), wk * v, 0.0) for wk, v in zip(w, trimmed, strict=True))
    den = sum(np.where((np.sign(v) == sign) & (v != 0), wk, 0.0) for wk, v in zip(w, trimmed, strict=True))
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@pytest.mark.parametrize("kind", ["weights", "delta"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_svd_knot_tying_matches_numpy(kind: str, density: float) -> None:
    inp = make_input(4, kind=kind)
    out = run("svd_knot_tying", inp, {"density": density})
    w = unit(inp)
    refs = {}
    for spec in inp.specs:
        _, ds = task_matrices(inp, spec)
        flip = ds[0].shape[0] > ds[0].shape[1]
        bs = [d.T if flip else d for d in ds]
        u, s, _ = np.linalg.svd(np.concatenate(bs, axis=1), full_matrices=False)
        r = int(np.sum(s**2 > min(bs[0].shape) * 2.0**-52 * s[0] ** 2))
        vs = [(u[:, :r].T @ b) / s[:r, None] for b in bs]
        merged = u[:, :r] @ (s[:r, None] * np_ties(vs, w, density))
        refs[spec.name] = merged.T if flip else merged
    check(out, inp, refs)


def test_svd_knot_tying_linear_is_the_weighted_task_average() -> None:
    inp = make_input(4)
    out = run("svd_knot_tying", inp, {"method": "linear"})
    w = unit(inp)
    check(out, inp, {s.name: sum(wk * d for wk, d in zip(w, task_matrices(inp, s)[1], strict=True))
                     for s in inp.specs})


@pytest.mark.parametrize("params", [{}, {"stability": 1.0, "rank_fraction": 0.2}, {"stability": 0.0}])
@pytest.mark.parametrize("kind", ["weights", "delta"])
def test_dual_projection_matches_numpy_svd(params: dict, kind: str) -> None:
    inp = make_input(5, kind=kind)
    out = run("dual_projection", inp, params)
    stability = params.get("stability", 0.5)
    frac = params.get("rank_fraction", 0.5)
    w = unit(inp)
    refs = {}
    for spec in inp.specs:
        _, ds = task_matrices(inp, spec)
        d = np.stack([x.reshape(-1) for x in ds])
        _, _, vt = np.linalg.svd(d, full_matrices=False)
        k = max(1, min(len(ds), math.floor(frac * len(ds) + 0.5)))
        shared = d @ vt[:k].T @ vt[:k]
        refs[spec.name] = w @ shared + (1.0 - stability) * (w @ (d - shared))
    check(out, inp, refs)


@pytest.mark.parametrize("name", ["star", "adarank"])
def test_vectors_are_rank_one_and_kept_whole(name: str) -> None:
    """A vector has one singular value: truncation keeps it, the merge is the weighted task average."""
    inp = make_input(3)
    spec = next(s for s in inp.specs if len(s.shape) == 1)
    out = run(name, inp, {})
    _, ds = task_matrices(inp, spec)
    w = unit(inp)
    check({spec.name: out[spec.name]}, MergeInput(inp.tensors, inp.weights, inp.kind, [spec], inp.seed, inp.base),
          {spec.name: sum(wk * d for wk, d in zip(w, ds, strict=True))})


@pytest.mark.parametrize("name", NAMES)
def test_arrival_order_never_changes_bytes(name: str) -> None:
    """Contributions are sorted by content first, so any permutation gives the same bytes
    (not only on quantised inputs)."""
    inp = make_input(5, weights=[1.0, 3.0, 2.0, 1.0, 0.5])
    ref = run(name, inp, RUNNABLE[name])
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        p = MergeInput([inp.tensors[k] for k in perm], [inp.weights[k] for k in perm], inp.kind, inp.specs,
                       inp.seed, inp.base)
        out = run(name, p, RUNNABLE[name])
        for spec in inp.specs:
            assert same(out[spec.name], ref[spec.name]), (perm, spec.name)


@pytest.mark.parametrize("name", NAMES)
def test_bigger_matrices_same_bytes_for_threads_and_chunks(name: str) -> None:
    rng = np.random.default_rng(8)
    shape = (40, 300)
    base = rng.standard_normal(shape).astype(np.float32)
    xs = [base + np.float32(0.01) * rng.standard_normal(shape).astype(np.float32) for _ in range(6)]
    spec = [TensorSpec("w", "F32", shape), TensorSpec("wt", "BF16", (300, 24))]
    bt = from_f32(rng.standard_normal((300, 24)).astype(np.float32), "BF16")
    tensors = [
        {"w": x, "wt": from_f32(to_f32(bt, "BF16") + rng.normal(0.0, 0.02, (300, 24)).astype(np.float32), "BF16")}
        for x in xs
    ]
    inp = MergeInput(tensors, [1.0, 2.0, 1.0, 3.0, 1.0, 1.0], "weights", spec, bytes(32), {"w": base, "wt": bt})
    with using_threads(1):
        ref = run(name, inp, RUNNABLE[name])
    for threads, chunk in ((2, 8), (3, 4096), (2, 1 << 20)):
        with using_threads(threads, grain=64):
            out = run(name, inp, RUNNABLE[name], chunk_elements=chunk)
        for s in spec:
            assert same(out[s.name], ref[s.name]), (threads, chunk, s.name)


def test_star_full_rank_gives_identical_inputs_back() -> None:
    """rank_fraction 1 keeps every component (no projection), so N copies give the copy back."""
    one = make_input(1)
    inp = MergeInput([one.tensors[0]] * 4, [1.0, 2.0, 1.0, 3.0], "weights", one.specs, one.seed, one.base)
    for name, params in (("star", {"rank_fraction": 1.0}), ("adarank", {"energy": 1.0}),
                         ("svd_knot_tying", {"method": "linear"})):
        out = run(name, inp, params)
        for spec in inp.specs:
            got = to_f32(out[spec.name], spec.dtype)
            assert np.allclose(got, to_f32(one.tensors[0][spec.name], spec.dtype), rtol=1e-6, atol=1e-7), name


def test_matrix_above_the_size_cap_is_refused() -> None:
    n = MAX_RANK + 1
    spec = [TensorSpec("big.w", "F32", (n, n))]
    x = {"big.w": np.zeros((n, n), dtype=np.float32)}
    inp = MergeInput([x, x], [1.0, 1.0], "delta", spec, bytes(32))
    for name in ("star", "adarank", "svd_knot_tying"):
        with pytest.raises(StrategyError, match=rf"{name}: tensor 'big.w' is a {n}x{n} matrix.*<= {MAX_RANK}"):
            run(name, inp, {})
    # dual_projection never decomposes the tensor, only the N x N Gram matrix
    out = run("dual_projection", inp, {})
    assert not np.any(out["big.w"])


@pytest.mark.parametrize("name", NAMES)
def test_bad_parameters_and_weights(name: str) -> None:
    inp = make_input(3)
    bad = {"star": [{"rank_fraction": 0.0}, {"rescale": "max"}],
           "adarank": [{"energy": 1.5}, {"target_rank": 0}],
           "svd_knot_tying": [{"density": 0.0}, {"method": "dare"}],
           "dual_projection": [{"stability": -0.1}, {"rank_fraction": 0.0}]}[name]
    for params in bad:
        field = next(iter(params))
        with pytest.raises(StrategyError, match=field):
            run(name, inp, params)
    neg = MergeInput(inp.tensors, [1.0, -1.0, 1.0], inp.kind, inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match="non-negative weights"):
        run(name, neg)
    zero = MergeInput(inp.tensors, [0.0, 0.0, 0.0], inp.kind, inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match="total contribution weight is zero"):
        run(name, zero)
    no_base = MergeInput(inp.tensors, inp.weights, "weights", inp.specs, inp.seed, None)
    with pytest.raises(StrategyError, match="task vectors"):
        run(name, no_base)
    lora = MergeInput(inp.tensors, inp.weights, "lora", inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match="does not support 'lora'"):
        run(name, lora)
