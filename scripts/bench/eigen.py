"""Deterministic eigensolver (meshmerge.cext.eigen) against LAPACK in the same run.

The spectral merges (star, adarank, svd_knot_tying) decompose the m x m Gram
matrix of each m x 2m task matrix. This times, on such Grams, our ``eigh``
(all vectors, by QL), ``eigh_top`` (the m/2 leading vectors, as star keeps, and
all m, as svd_knot_tying takes them) and
LAPACK through numpy (``eigh``, and the ``svd`` of the task matrix itself,
which is what crdt-merge calls), each single-threaded (OpenBLAS is limited to
one thread before numpy loads; ours run with ``threads=1``) and best of several calls. Ratios, not
absolute times: the machine is shared.

    .venv/bin/python scripts/bench/eigen.py [--sizes 64,256,512,1024]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
from _table import machine, table

from meshmerge.cext import eigh, eigh_top, matmul


def best(fn: Callable[[], object], budget: float) -> float:
    """Best of at least 3 calls, more while the total stays under `budget` seconds."""
    times: list[float] = []
    while len(times) < 3 or (sum(times) < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,256,512,1024", help="comma-separated m")
    args = ap.parse_args()
    rows: list[list[object]] = []
    for m in (int(x) for x in args.sizes.split(",")):
        b = np.random.default_rng(m).standard_normal((m, 2 * m))
        g = matmul(b, np.ascontiguousarray(b.T))
        budget = 1.0 if m <= 512 else 4.0
        t_all = best(lambda g=g: eigh(g), budget)
        t_top = best(lambda g=g, m=m: eigh_top(g, lambda v: m // 2, threads=1), budget)
        t_every = best(lambda g=g, m=m: eigh_top(g, lambda v: m, threads=1), budget)
        t_lapack = best(lambda g=g: np.linalg.eigh(g), budget)
        t_svd = best(lambda b=b: np.linalg.svd(b, full_matrices=False), budget)
        vals, vecs = eigh(g)
        resid = float(np.max(np.abs(g @ vecs - vecs * vals)) / np.max(np.abs(g)))
        rows.append([m, f"{t_all * 1e3:.2f}", f"{t_top * 1e3:.2f}", f"{t_every * 1e3:.2f}", f"{t_lapack * 1e3:.2f}",
                     f"{t_svd * 1e3:.2f}", f"{t_all / t_lapack:.2f}x", f"{t_top / t_lapack:.2f}x",
                     f"{t_svd / t_top:.2f}x", f"{resid:.1e}"])
    print(f"# eigensolver, {machine()}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(table(["m", "eigh ms", "eigh_top (m/2) ms", "eigh_top (all m) ms", "LAPACK eigh ms", "LAPACK svd (m x 2m) ms",
                 "eigh / LAPACK eigh", "eigh_top / LAPACK eigh", "LAPACK svd / eigh_top",
                 "max |G v - lambda v| / max |G|"], rows))


if __name__ == "__main__":
    main()
