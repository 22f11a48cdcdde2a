"""Merge-kernel benchmark: meshmerge strategies vs plain numpy, crdt-merge and mergekit.

One run, N = 4 and N = 16 contributions of M float32 parameters (default
25M = 100 MB each; ``--small`` uses 2.5M). For each operation it reports
seconds and GB/s of contribution bytes read, next to the machine's memory
bandwidth measured in the same run (numpy sum over the same N arrays = read
roofline; numpy copy of one array, read + write bytes).

mergekit runs on CPU torch in a separate virtualenv (``.bench-venv``, created
on demand by ``scripts/bench/kernels_setup_mergekit``); its process builds the
same inputs from the same seed and reports its own timings.

    scripts/bench/run kernels            # full size (heavy: ~2 GB RAM per N=16 input set)
    .venv/bin/python scripts/bench/kernels.py --small
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import machine, table

from meshmerge.cext import get_threads, weighted_sum_f32
from meshmerge.cext.outbuf import empty_f32, output_cache_bytes, set_output_cache
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.tensors import TensorSpec

ROOT = Path(__file__).resolve().parents[2]
MERGEKIT_PY = ROOT / ".bench-venv" / "bin" / "python"
SEED = 20261123
DENSITY = 0.2  # TIES keep fraction
DARE_DENSITY = 0.5  # DARE keep probability
TRIM = 0.125


def make_data(n: int, m: int, seed: int = SEED) -> tuple[np.ndarray, list[np.ndarray]]:
    """Base model and n fine-tuned variants (float32), reproducible from the seed."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(m, dtype=np.float32)
    xs = []
    for _ in range(n):
        d = rng.standard_normal(m, dtype=np.float32)
        d *= np.float32(0.01)
        d += base
        xs.append(d)
    return base, xs


def sum_threads(xs: list[np.ndarray], threads: int) -> None:
    """numpy sum of the same bytes split over threads (each sums its share of every array;
    numpy releases the GIL inside the reduction)."""
    import threading

    def part(t: int) -> None:
        for x in xs:
            step = -(-x.size // threads)
            x[t * step : (t + 1) * step].sum()

    ths = [threading.Thread(target=part, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


def timed(fn: Callable[[], Any], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- plain numpy, written the way a user would (float32, chunked where it is natural) ----

CHUNK = 1 << 20


def np_linear(xs: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    out = np.empty_like(xs[0])
    for lo in range(0, out.size, CHUNK):
        acc = xs[0][lo : lo + CHUNK] * np.float32(w[0])
        for k in range(1, len(xs)):
            acc += xs[k][lo : lo + CHUNK] * np.float32(w[k])
        out[lo : lo + CHUNK] = acc
    return out


def np_ties(xs: list[np.ndarray], base: np.ndarray, w: np.ndarray, density: float) -> np.ndarray:
    m = base.size
    r = math.ceil(density * m)
    trimmed = []
    for x in xs:
        tv = x - base
        mag = np.abs(tv)
        thr = np.partition(mag, m - r)[m - r]
        trimmed.append(np.where(mag >= thr, tv, np.float32(0)))
    t = np.stack(trimmed)
    wc = w.astype(np.float32)[:, None]
    sign = np.sign((t * wc).sum(0))
    agree = (np.sign(t) == sign) & (t != 0)
    num = (t * wc * agree).sum(0)
    den = (wc * agree).sum(0)
    return base + np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def np_dare_ties(xs: list[np.ndarray], base: np.ndarray, w: np.ndarray, density: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.stack([np.where(rng.random(base.size) < density, (x - base) / np.float32(density), 0)
                  for x in xs])
    wc = w.astype(np.float32)[:, None]
    sign = np.sign((t * wc).sum(0))
    agree = (np.sign(t) == sign) & (t != 0)
    num = (t * wc * agree).sum(0)
    den = (wc * agree).sum(0)
    return base + np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def np_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    th = math.acos(max(-1.0, min(1.0, c)))
    s = math.sin(th)
    return np.float32(math.sin((1 - t) * th) / s) * a + np.float32(math.sin(t * th) / s) * b


def np_karcher(xs: list[np.ndarray], w: np.ndarray, steps: int = 10) -> np.ndarray:
    norms = np.array([np.linalg.norm(x) for x in xs])
    u = [x / np.float32(nr) for x, nr in zip(xs, norms, strict=True)]
    m = sum(np.float32(wk) * uk for wk, uk in zip(w, u, strict=True))
    m /= np.linalg.norm(m)
    for _ in range(steps):
        v = np.zeros_like(m)
        for wk, uk in zip(w, u, strict=True):
            c = float(np.clip(np.dot(uk, m), -1, 1))
            th = math.acos(c)
            f = 1.0 if th == 0 else th / math.sin(th)
            v += np.float32(wk * f) * (uk - np.float32(c) * m)
        vn = float(np.linalg.norm(v))
        if vn == 0:
            break
        m = np.float32(math.cos(vn)) * m + np.float32(math.sin(vn) / vn) * v
        m /= np.linalg.norm(m)
    return np.float32(float(np.dot(w, norms))) * m


def np_median(xs: list[np.ndarray]) -> np.ndarray:
    out = np.empty_like(xs[0])
    for lo in range(0, out.size, CHUNK):
        out[lo : lo + CHUNK] = np.median(np.stack([x[lo : lo + CHUNK] for x in xs]), axis=0)
    return out


def np_trimmed(xs: list[np.ndarray], trim: float) -> np.ndarray:
    k = math.floor(trim * len(xs))
    out = np.empty_like(xs[0])
    for lo in range(0, out.size, CHUNK):
        s = np.sort(np.stack([x[lo : lo + CHUNK] for x in xs]), axis=0)
        out[lo : lo + CHUNK] = s[k : len(xs) - k].mean(0)
    return out


# ---- crdt-merge 0.11.0 ----


def crdt_merge_ops() -> dict[str, Callable[..., Any]] | None:
    try:
        from crdt_merge.model.strategies import get_strategy
    except ImportError:
        return None

    def op(name: str, **kw: Any) -> Callable[..., Any]:
        s = get_strategy(name)
        return lambda xs, w, base: s.merge(list(xs), weights=list(w), base=base, **kw)

    return {
        "linear": op("weight_average"),
        "ties": op("ties", density=DENSITY),
        "dare": op("dare", drop_rate=1 - DARE_DENSITY),
        "dare_ties": op("dare_ties", drop_rate=1 - DARE_DENSITY, density=1.0),
        "slerp (pair)": op("slerp", t=0.5),
    }


# ---- mergekit (separate process, own venv) ----


def run_mergekit(n: int, m: int, ops: list[str]) -> dict[str, Any]:
    if not MERGEKIT_PY.exists():
        return {"error": "mergekit venv missing (.bench-venv); run scripts/bench/kernels_setup_mergekit"}
    runner = str(Path(__file__).with_name("_mergekit_runner.py"))
    cmd = [str(MERGEKIT_PY), runner, str(n), str(m), ",".join(ops)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def ours(name: str, params: dict[str, Any]) -> Callable[[MergeInput], Any]:
    strat = strategies.get(name)
    return lambda inp: strat.run(inp, params)


def bench_size(
    n: int, m: int, peers: dict[str, Callable[..., Any]] | None, with_mergekit: bool
) -> list[list[Any]]:
    base, xs = make_data(n, m)
    w = np.ones(n)
    spec = [TensorSpec("w", "F32", (m,))]
    inp = MergeInput([{"w": x} for x in xs], list(w), "weights", spec, bytes(32), {"w": base})
    pair = MergeInput([{"w": x} for x in xs[:2]], [1.0, 1.0], "weights", spec, bytes(32), {"w": base})
    nbytes = n * m * 4
    pbytes = 2 * m * 4
    rows: list[list[Any]] = []

    t_sum = timed(lambda: [x.sum() for x in xs], 5)
    t_sum2 = timed(lambda: sum_threads(xs, 2), 5)
    dst = np.empty_like(xs[0])
    t_copy = timed(lambda: np.copyto(dst, xs[0]), 5)
    # The roofline is a numpy sum (one thread, as numpy runs it); ours may use two
    # threads, so the table also compares against the better of the 1- and 2-thread sums.
    roof = max(nbytes / t_sum, nbytes / t_sum2) / 1e9
    roof1 = nbytes / t_sum / 1e9
    rows.append([n, "roofline: numpy sum (read), 1 thread", f"{t_sum:.3f}", f"{nbytes / t_sum / 1e9:.2f}",
                 "", "", "", "", ""])
    rows.append([n, "roofline: numpy sum (read), 2 threads", f"{t_sum2:.3f}", f"{nbytes / t_sum2 / 1e9:.2f}",
                 "", "", "", "", ""])
    rows.append([n, "roofline: numpy copy (read+write)", f"{t_copy:.3f}", f"{2 * m * 4 / t_copy / 1e9:.2f}",
                 "", "", "", "", ""])
    for r in rows:
        progress(r)

    mk = run_mergekit(n, m, MK_OPS) if with_mergekit else {"error": "skipped (--no-peers)"}
    cases: list[tuple[str, int, Callable[[], Any], Callable[[], Any] | None]] = [
        ("linear", nbytes, lambda: ours("linear", {})(inp), lambda: np_linear(xs, w / n)),
        ("task_arithmetic", nbytes, lambda: ours("task_arithmetic", {})(inp), None),
        ("ties", nbytes, lambda: ours("ties", {"density": DENSITY})(inp),
         lambda: np_ties(xs, base, w, DENSITY)),
        ("dare", nbytes, lambda: ours("dare", {"density": DARE_DENSITY})(inp), None),
        ("dare_ties", nbytes, lambda: ours("dare_ties", {"density": DARE_DENSITY})(inp),
         lambda: np_dare_ties(xs, base, w, DARE_DENSITY)),
        ("slerp (pair)", pbytes, lambda: ours("slerp", {"t": 0.5})(pair),
         lambda: np_slerp(xs[0], xs[1], 0.5)),
        ("karcher (multi)", nbytes, lambda: ours("karcher", {})(inp), lambda: np_karcher(xs, w / n)),
        ("median", nbytes, lambda: ours("median", {})(inp), lambda: np_median(xs)),
        ("trimmed_mean", nbytes, lambda: ours("trimmed_mean", {"trim": TRIM})(inp),
         lambda: np_trimmed(xs, TRIM)),
        ("geometric_median", nbytes, lambda: ours("geometric_median", {})(inp), None),
        ("multi_krum", nbytes, lambda: ours("multi_krum", {})(inp), None),
    ]
    for label, nb, fn_ours, fn_np in cases:
        t_ours = timed(fn_ours, 3)
        g_ours = nb / t_ours / 1e9
        t_np = timed(fn_np, 1) if fn_np is not None else None
        t_cm = None
        if peers is not None and label in peers:
            sub = xs[:2] if label == "slerp (pair)" else xs
            op = peers[label]
            t_cm = timed(lambda op=op, sub=sub: op(sub, [1.0] * len(sub), base), 1)
        got = mk.get(label)
        if isinstance(got, float):
            mk_cell = ratio_cell(got, nb, t_ours)
        elif label not in MK_OPS:
            mk_cell = "n/a"
        else:
            mk_cell = f"not run: {got if got is not None else mk.get('error', 'unknown')}"
        rows.append([n, label, f"{t_ours:.3f}", f"{g_ours:.2f}", f"{100 * g_ours / roof1:.0f}%",
                     f"{100 * g_ours / roof:.0f}%",
                     ratio_cell(t_np, nb, t_ours), ratio_cell(t_cm, nb, t_ours), mk_cell])
        progress(rows[-1])
    return rows


# ---- every strategy crdt-merge 0.11.0 also offers, at N = 16 ----
# (crdt-merge name, our name, our params, crdt-merge kwargs, M). M is smaller where
# crdt-merge is pure-Python slow (its time grows linearly in M; the ratio is what counts).
FULL_M = 25_000_000
COVERAGE: list[tuple[str, str, dict[str, Any], dict[str, Any], int]] = [
    ("weight_average", "weight_average", {}, {}, FULL_M),
    ("linear", "linear", {}, {}, FULL_M),
    ("task_arithmetic", "task_arithmetic", {}, {}, FULL_M),
    ("negative_merge", "negative_merge", {}, {}, FULL_M),
    # crdt-merge's 16-input slerp is 15 pairwise numpy steps on float64 copies; at M = 1M
    # those (8 MB each) stay in the 32 MB L3 while our two passes stream 64 MB from DRAM,
    # so the ratio is given at both sizes.
    ("slerp (16 inputs)", "slerp", {}, {}, FULL_M),
    ("fisher_merge", "fisher_merge", {}, {"fisher": True}, 2_500_000),
    ("ties", "ties", {"density": DENSITY}, {"density": DENSITY}, 2_500_000),
    ("dare", "dare", {"density": DARE_DENSITY}, {"drop_rate": 1 - DARE_DENSITY}, 2_500_000),
    ("dare_ties", "dare_ties", {"density": DARE_DENSITY}, {"drop_rate": 1 - DARE_DENSITY, "density": 1.0},
     2_500_000),
    ("della", "della", {}, {}, 1_000_000),
    ("emr", "emr", {}, {}, 2_500_000),
    ("model_breadcrumbs", "model_breadcrumbs", {}, {}, 2_500_000),
    ("led_merge", "led_merge", {}, {}, 1_000_000),
    ("safe_merge", "safe_merge", {}, {}, 2_500_000),
    ("slerp (16 inputs)", "slerp", {}, {}, 1_000_000),
    ("weight_scope_alignment", "weight_scope_alignment", {}, {}, 2_500_000),
    ("evolutionary_merge", "evolutionary_merge", {}, {}, 1_000),
    ("genetic_merge", "genetic_merge", {}, {}, 1_000),
    # Data-free proxies (meshmerge/crdt/strategies/datafree.py); crdt-merge's ada_merging and
    # dam redo a full float64 merge per refinement step (100 / 50 steps), ours one Gram pass.
    ("regression_mean", "regression_mean", {}, {}, 10_000_000),
    ("ada_merging", "ada_merging", {"granularity": "layer"}, {}, 250_000),
    ("dam", "dam", {}, {}, 500_000),
    ("representation_surgery", "representation_surgery", {"correction": "rescale"},
     {"correction_method": "rescale"}, 10_000_000),
    ("split_unlearn_merge", "split_unlearn_merge", {"fraction": 0.1}, {"target_fraction": 0.1}, 250_000),
    # SVD-based: per-layer matrices (crdt-merge runs LAPACK SVDs; ours the deterministic eigensolver
    # on the Gram matrix, capped at min(rows, cols) <= 1024; --small keeps these shapes).
    # dual_projection only decomposes the N x N Gram.
    ("star (256x1024)", "star", {}, {}, 256 * 1024),
    ("adarank (256x1024)", "adarank", {}, {}, 256 * 1024),
    ("svd_knot_tying (256x1024)", "svd_knot_tying", {}, {}, 256 * 1024),
    ("star (512x1024)", "star", {}, {}, 512 * 1024),
    ("svd_knot_tying (512x1024)", "svd_knot_tying", {}, {}, 512 * 1024),
    ("dual_projection", "dual_projection", {}, {}, 1_000_000),
]
#: 2-D shapes for the rows that need matrices (label -> shape); the others are 1-D of M elements.
COVERAGE_SHAPES: dict[str, tuple[int, ...]] = {
    label: tuple(int(x) for x in label.split("(")[1].rstrip(")").split("x"))
    for label, *_ in COVERAGE
    if label.endswith(")") and "x" in label.split("(")[1]
}


def coverage_table(n: int, small: bool, only: set[str] | None = None) -> str:
    """Ours vs crdt-merge for every strategy name both offer (or the ``only`` ones), same inputs, same run."""
    from crdt_merge.model.strategies import get_strategy

    rows: list[list[Any]] = []
    data: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    for cm_name, our_name, params, cm_kw, m_full in COVERAGE:
        if only is not None and cm_name.split(" ")[0] not in only:
            continue
        shape = COVERAGE_SHAPES.get(cm_name)
        m = max(1_000, m_full // 10) if small and m_full > 1_000 and shape is None else m_full
        if m not in data:
            data.clear()
            data[m] = make_data(n, m)
        base, xs = data[m]
        kw = dict(cm_kw)
        if shape is not None:
            base, xs = base.reshape(shape), [x.reshape(shape) for x in xs]
        tensors = [{"w": x} for x in xs]
        spec = [TensorSpec("w", "F32", shape or (m,))]
        if kw.pop("fisher", False):
            fishers = [x * x for x in xs]
            tensors = [{"w": x, "w.fisher": f} for x, f in zip(xs, fishers, strict=True)]
            spec = [TensorSpec("w", "F32", (m,)), TensorSpec("w.fisher", "F32", (m,))]
            kw["fisher_matrices"] = fishers
        inp = MergeInput(tensors, [1.0] * n, "weights", spec, bytes(32), {s.name: base for s in spec})
        strat = strategies.get(our_name)
        t_ours = timed(lambda strat=strat, inp=inp, params=params: strat.run(inp, params), 2)
        cm = get_strategy(cm_name.split(" ")[0])
        try:
            # One untimed full-size call first, as ours gets (best of 2): the first call
            # of a size pays one-time costs (lazy imports, and page faults on fresh memory:
            # glibc serves the first large temporaries by mmap, later ones from a heap that
            # is already faulted in). A 1,000-element warm-up left that to chance: crdt-merge's
            # fisher_merge at M = 2.5M took 4.1 s on its first full call, 0.6-0.7 s after.
            cm.merge(list(xs), weights=[1.0] * n, base=base, **kw)
            t_cm: float | str = timed(
                lambda cm=cm, xs=xs, base=base, kw=kw: cm.merge(list(xs), weights=[1.0] * n, base=base, **kw), 1
            )
        except Exception as e:  # report, do not hide: their failure is a result too
            t_cm = f"failed: {type(e).__name__}"
        # OpenBLAS's threads busy-wait for a while after crdt-merge's last LAPACK call; the
        # next row's timing of ours (star 256 x 1024: 0.144-0.166 s right after, 0.116-0.126 s
        # once they sleep) would pay for them. Half a second lets them go idle.
        time.sleep(0.5)
        nb = n * m * 4
        if isinstance(t_cm, float):
            cells = [f"{t_cm:.3f}", f"{nb / t_cm / 1e9:.3f}", f"{t_cm / t_ours:.3g}x"]
        else:
            cells = [t_cm, "", ""]
        rows.append([n, cm_name, f"{m:,}", f"{t_ours:.4f}", f"{nb / t_ours / 1e9:.2f}", *cells])
        progress(rows[-1])
    return table(["N", "strategy", "M", "ours s", "ours GB/s", "crdt-merge s", "crdt-merge GB/s",
                  "crdt-merge / ours"], rows)


def progress(row: list[Any]) -> None:
    """Each row on stderr as soon as it is measured (the tables go to stdout at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f}] " + " | ".join(map(str, row)),
          file=sys.stderr, flush=True)


def ratio_cell(t: float | None, nb: int, t_ours: float) -> str:
    if t is None:
        return "n/a"
    return f"{t:.2f} s, {nb / t / 1e9:.2f} GB/s ({t / t_ours:.2g}x)"


LINEAR_REUSED = "linear kernel, output reused"
LINEAR_FRESH = "linear, output cache off"


def linear_without_output_cache(inp: MergeInput) -> None:
    """One linear merge whose output lands on fresh pages; the cache is left as it was."""
    held = empty_f32(inp.specs[0].numel)  # takes the cached mapping, if any, off the cache
    _, limit = output_cache_bytes()
    set_output_cache(0)
    try:
        strategies.get("linear").run(inp, {})  # result dropped here: unmapped, not cached
    finally:
        set_output_cache(limit)
    del held  # back into the cache for the next cached run

INTERLEAVED_OPS: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}), ("ties", {"density": DENSITY}), ("dare_ties", {"density": DARE_DENSITY}),
    ("karcher", {}), ("safe_merge", {}),
]


def interleaved_best(n: int, m: int, rounds: int) -> dict[str, float]:
    """Best time of the 1-/2-thread numpy sums and each op, measured alternately round after round."""
    base, xs = make_data(n, m)
    spec = [TensorSpec("w", "F32", (m,))]
    inp = MergeInput([{"w": x} for x in xs], [1.0] * n, "weights", spec, bytes(32), {"w": base})
    fns: list[tuple[str, Callable[[], Any]]] = [
        ("sum1", lambda: [x.sum() for x in xs]), ("sum2", lambda: sum_threads(xs, 2)),
    ]
    for name, params in INTERLEAVED_OPS:
        fns.append((name, lambda name=name, params=params: strategies.get(name).run(inp, params)))
    # linear with the output cache off: every call writes fresh pages, which the
    # kernel must zero first (a one-shot merge pays this; the read-only numpy sum
    # does not). And the linear kernel alone into an output written before.
    fns.append((LINEAR_FRESH, lambda: linear_without_output_cache(inp)))
    reused = np.zeros(m, dtype=np.float32)
    wn = np.full(n, 1.0 / n)
    fns.append((LINEAR_REUSED, lambda: weighted_sum_f32(xs, wn, reused)))
    best = {key: math.inf for key, _ in fns}
    for _ in range(rounds):
        for key, fn in fns:
            best[key] = min(best[key], timed(fn, 1))
    return best


def interleaved_table(sizes: list[int], m: int, rounds: int) -> str:
    """Ours vs the numpy rooflines measured alternately (best of each).

    On a shared machine the load changes within seconds; alternating the
    measurements gives both sides the same conditions, which a roofline taken
    once at the start of a long run does not.
    """
    rows: list[list[Any]] = []
    for n in sizes:
        best = interleaved_best(n, m, rounds)
        nb = n * m * 4
        roof = nb / min(best["sum1"], best["sum2"]) / 1e9
        roof1 = nb / best["sum1"] / 1e9
        rows.append([n, "numpy sum, 1 thread", f"{best['sum1']:.3f}", f"{nb / best['sum1'] / 1e9:.2f}", "", ""])
        rows.append([n, "numpy sum, 2 threads", f"{best['sum2']:.3f}", f"{nb / best['sum2'] / 1e9:.2f}", "", ""])
        for name in [*(op for op, _ in INTERLEAVED_OPS), LINEAR_FRESH, LINEAR_REUSED]:
            g = nb / best[name] / 1e9
            rows.append([n, name, f"{best[name]:.3f}", f"{g:.2f}", f"{100 * g / roof1:.0f}%",
                         f"{100 * g / roof:.0f}%"])
            progress(rows[-1])
    return table(["N", "operation", "best s", "GB/s", "of numpy sum (1 thread)", "of the faster numpy sum"], rows)


def anon_rss() -> int:
    """Resident anonymous memory of this process in bytes (inputs here are anonymous too)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_rss(fn: Callable[[], Any]) -> int:
    """Peak anonymous RSS above the level before ``fn`` (sampled every 2 ms), in bytes."""
    import threading

    before = anon_rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anon_rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    try:
        result = fn()
        peak = max(peak, anon_rss())
    finally:
        done.set()
        th.join()
    del result
    return peak - before


def rss_table(n: int, m: int) -> str:
    base, xs = make_data(n, m)
    spec = [TensorSpec("w", "F32", (m,))]
    inp = MergeInput([{"w": x} for x in xs], [1.0] * n, "weights", spec, bytes(32), {"w": base})
    rows = []
    cases: list[tuple[str, dict[str, Any]]] = [
        ("linear", {}), ("ties", {"density": DENSITY}), ("dare_ties", {"density": DARE_DENSITY}),
        ("karcher", {}), ("median", {}), ("trimmed_mean", {"trim": TRIM}), ("geometric_median", {}),
    ]
    for name, params in cases:
        extra = peak_extra_rss(lambda name=name, params=params: strategies.get(name).run(inp, params))
        rows.append([n, name, f"{extra / 1e6:.0f}", f"{m * 4 / 1e6:.0f}", f"{extra / (m * 4):.2f}"])
    return table(["N", "strategy", "peak extra RSS MB", "output MB", "extra / output"], rows)


MK_OPS = ["linear", "ties", "dare", "dare_ties", "slerp (pair)", "karcher (multi)"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="2.5M parameters per contribution instead of 25M")
    ap.add_argument("--sizes", default="4,16", help="comma-separated N values")
    ap.add_argument("--no-peers", action="store_true", help="skip crdt-merge and mergekit")
    ap.add_argument("--rss", action="store_true", help="only measure peak extra memory of our strategies")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="only linear/ties/dare_ties and the numpy rooflines, measured alternately ROUNDS times")
    ap.add_argument("--coverage", action="store_true",
                    help="only the every-shared-strategy comparison with crdt-merge at N = 16")
    ap.add_argument("--only", default="", metavar="NAMES",
                    help="with --coverage: only these comma-separated crdt-merge strategy names")
    args = ap.parse_args()
    m = 2_500_000 if args.small else 25_000_000
    if args.rss:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
            # Large blocks via mmap so freed memory leaves RSS and each run is measured alone.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        for n in (int(s) for s in args.sizes.split(",")):
            print(rss_table(n, m) + "\n")
        return
    if args.interleaved:
        print(f"{machine()}; M = {m:,}; ours with {get_threads()} threads; best of {args.interleaved} "
              "alternating rounds.\n")
        print(interleaved_table([int(x) for x in args.sizes.split(",")], m, args.interleaved))
        return
    if args.coverage:
        print(f"{machine()}; ours with {get_threads()} threads; N = 16; GB/s = contribution bytes read / wall "
              "time (best of 2 for ours, 1 run for crdt-merge after one untimed full-size call).\n")
        only = {x.strip() for x in args.only.split(",") if x.strip()} or None
        unknown = (only or set()) - {c[0].split(" ")[0] for c in COVERAGE}
        if unknown:
            ap.error(f"--only: unknown names {sorted(unknown)}")
        print(coverage_table(16, args.small, only))
        return
    peers = None if args.no_peers else crdt_merge_ops()
    rows: list[list[Any]] = []
    for n in (int(s) for s in args.sizes.split(",")):
        rows += bench_size(n, m, peers, not args.no_peers)
    print(f"{machine()}; M = {m:,} float32 parameters per contribution; "
          f"TIES density {DENSITY}, DARE density {DARE_DENSITY}, trimmed mean trim {TRIM}; "
          f"ours with {get_threads()} threads (MESHMERGE_THREADS); mergekit with torch's default threads.\n")
    print("GB/s = contribution bytes read / wall time (best of 3 for ours and the rooflines, 1 run for the "
          "others); of numpy sum = ours / numpy's own (1-thread) sum of the same arrays; of 2-thread sum = "
          "ours / the faster of the 1- and 2-thread sums; (Nx) = their time / our time.\n")
    print(table(["N", "operation", "ours s", "ours GB/s", "of numpy sum", "of 2-thread sum", "numpy",
                 "crdt-merge 0.11.0",
                 "mergekit (CPU torch)"], rows))
    if peers is not None:
        print("\nEvery strategy crdt-merge 0.11.0 also offers, N = 16, same inputs for both, M per row "
              "(smaller where crdt-merge is pure-Python slow); best of 2 for ours, 1 run for crdt-merge after one untimed full-size call.\n")
        print(coverage_table(16, args.small))


if __name__ == "__main__":
    main()
