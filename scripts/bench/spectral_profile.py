"""Per-phase time of the spectral merges (star, adarank, svd_knot_tying) at the coverage shapes.

    nice .venv/bin/python scripts/bench/spectral_profile.py [--n 16] [--reps 3] [--shapes 256x1024,512x1024]
                                                            [names...]
    nice .venv/bin/python scripts/bench/spectral_profile.py --kernels [--old MODULE]

``--kernels`` instead times the matrix products alone (best of 7, GMAC/s = multiply-adds
per second; ``gram_rows`` counted as the full m x m product it replaces) for 1 and 2
kernel threads and each instruction-set variant; ``--old`` also times ``matmul`` of
another compiled module (e.g. the previous implementation built outside the tree).

Builds the inputs of ``kernels.py --coverage`` (N float32 contributions of one matrix
with a base, ``make_data``) and prints, per strategy and shape, the best wall time of
``strategy.run`` with the default kernel threads and with one thread, and for the
one-thread run the time per task matrix (total / N) spent in each phase: ``order``
(content_order: sha256 and NaN/Inf checks), ``widen`` (float32 -> float64, base
subtraction, transpose: TaskMatrices), ``gram``, ``eigensolve`` (``spectrum``, ``eigh_top``),
``projection`` (U_k U_k^T B, and svd_knot_tying's U^T B_i and U S V^T), ``ties``
(coordinate TIES), ``finish`` (back to float32) and ``other`` (the rest). Phases are
measured by wrapping those functions of :mod:`meshmerge.crdt.strategies.spectral`
(outermost call only); one thread keeps them sequential. The sha256 prefix of the
output must not change when a change must not change bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import table
from kernels import make_data

from meshmerge.cext import using_threads
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.strategies import spectral as sp
from meshmerge.crdt.tensors import TensorSpec

PHASES = ["order", "widen", "gram", "eigensolve", "projection", "ties", "finish"]
WRAPPED: dict[str, str] = {
    "content_order": "order",
    "gram_rows": "gram",
    "spectrum": "eigensolve",
    "eigh_top": "eigensolve",
    "project": "projection",
    "matmul": "projection",
    "ties_coordinates": "ties",
}
METHODS: dict[str, str] = {"__init__": "widen", "get": "widen", "finish": "finish"}

spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)
_depth = [0]


def timer(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if _depth[0]:
            return fn(*args, **kwargs)
        _depth[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - t0
            _depth[0] -= 1

    return wrapped


def instrument() -> None:
    for name, phase in WRAPPED.items():
        setattr(sp, name, timer(phase, getattr(sp, name)))
    for name, phase in METHODS.items():
        setattr(sp.TaskMatrices, name, timer(phase, getattr(sp.TaskMatrices, name)))


def best_run(strat: Any, inp: MergeInput, reps: int) -> tuple[float, dict[str, float], dict[str, Any]]:
    best, best_spent, out = float("inf"), dict(spent), {}
    for _ in range(reps):
        for k in spent:
            spent[k] = 0.0
        t0 = time.perf_counter()
        out = strat.run(inp, {})
        dt = time.perf_counter() - t0
        if dt < best:
            best, best_spent = dt, dict(spent)
    return best, best_spent, out


def kernels(old: str | None) -> None:
    import importlib

    from meshmerge.cext.gemm import gram_rows, matmul

    rng = np.random.default_rng(1)
    rows = []
    for m, L, k in [(256, 1024, 128), (512, 1024, 256)]:
        b = rng.standard_normal((m, L))
        bt = np.ascontiguousarray(b.T)
        u = rng.standard_normal((m, k))
        c = rng.standard_normal((k, L))
        cases: list[tuple[str, Callable[..., Any], tuple[Any, ...], int]] = [
            (f"matmul {m}x{L} @ {L}x{m}", matmul, (b, bt), m * m * L),
            (f"gram_rows {m}x{L}", gram_rows, (b,), m * m * L),
            (f"matmul U_k^T B ({k}x{m} @ {m}x{L})", matmul, (u.T, b), k * m * L),
            (f"matmul U_k C ({m}x{k} @ {k}x{L})", matmul, (u, c), k * m * L),
        ]
        if old is not None:
            old_mm = importlib.import_module(old).matmul
            cases.append((f"old {old}.matmul {m}x{L} @ {L}x{m}", old_mm, (b, bt), m * m * L))
        for label, fn, fargs, macs in cases:
            for isa in ([None, "avx2", "generic"] if not label.startswith("old") else [None]):
                kw = {"isa": isa} if isa is not None else {}
                cells = []
                for threads in (1, 2):
                    with using_threads(threads):
                        fn(*fargs, **kw)
                        best = float("inf")
                        for _ in range(7):
                            t0 = time.perf_counter()
                            fn(*fargs, **kw)
                            best = min(best, time.perf_counter() - t0)
                    cells += [f"{best * 1e3:.2f}", f"{macs / best / 1e9:.1f}"]
                rows.append([label, isa or "best", *cells])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["product", "variant", "ms (1 thread)", "GMAC/s (1 thread)", "ms (2 threads)",
                 "GMAC/s (2 threads)"], rows))
    # coordinate TIES of 16 tasks (svd_knot_tying, density 0.5): the kernel and the numpy code
    # it replaced (kept in the tests as the reference)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from meshmerge.cext.ties64 import ties_coordinates
    from tests.cext.test_ties64 import reference

    trows = []
    for m in (256, 512):
        vs = [rng.standard_normal((m, 1024)) for _ in range(16)]
        w = [float(x) for x in rng.random(16) / 16]
        assert ties_coordinates(vs, w, 0.5).tobytes() == reference(vs, w, 0.5).tobytes()
        for label, fn in (("ties64 kernel", ties_coordinates), ("numpy (before)", reference)):
            cells = []
            for threads in (1, 2):
                with using_threads(threads):
                    best = float("inf")
                    for _ in range(3):
                        t0 = time.perf_counter()
                        fn(vs, w, 0.5)
                        best = min(best, time.perf_counter() - t0)
                cells.append(f"{best * 1e3:.1f}")
            trows.append([f"16 x {m}x1024", label, *cells])
    print()
    print(table(["coordinate TIES", "implementation", "ms (1 thread)", "ms (2 threads)"], trows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="256x1024,512x1024")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--old", default=None)
    ap.add_argument("names", nargs="*", default=["star", "adarank", "svd_knot_tying"])
    args = ap.parse_args()
    if args.kernels:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}",
              file=sys.stderr)
        kernels(args.old)
        print(f"end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        return
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}, "
          f"N = {args.n}", file=sys.stderr)
    rows = []
    for shape_s in args.shapes.split(","):
        shape = tuple(int(x) for x in shape_s.split("x"))
        m = shape[0] * shape[1]
        base, xs = make_data(args.n, m)
        spec = [TensorSpec("w", "F32", shape)]
        inp = MergeInput([{"w": x.reshape(shape)} for x in xs], [1.0] * args.n, "weights", spec, bytes(32),
                         {"w": base.reshape(shape)})
        for name in args.names:
            strat = strategies.get(name)
            t_default, _, out = best_run(strat, inp, args.reps)
            with using_threads(1):
                t_one, ph, out1 = best_run(strat, inp, args.reps)
            digest = hashlib.sha256(np.asarray(out["w"]).tobytes()).hexdigest()[:16]
            assert hashlib.sha256(np.asarray(out1["w"]).tobytes()).hexdigest()[:16] == digest
            per = {k: 1e3 * v / args.n for k, v in ph.items()}
            other = 1e3 * t_one / args.n - sum(per.values())
            rows.append([name, shape_s, f"{t_default:.3f}", f"{t_one:.3f}",
                         *[f"{per[k]:.2f}" for k in PHASES], f"{other:.2f}", digest])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(table(["strategy", "shape", "s (default threads)", "s (1 thread)",
                 *[f"{k} ms/matrix" for k in PHASES], "other ms/matrix", "sha256"], rows))
    print(f"\nend {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}", file=sys.stderr)


if __name__ == "__main__":
    instrument()
    main()
