"""Time the sparse strategies (TIES, DARE-TIES, breadcrumbs) and the share of the magnitude thresholds.

    nice .venv/bin/python scripts/bench/sparse_profile.py [--n 16] [--m 2500000] [--reps 7] [names...]

Builds N contributions of M float32 parameters with ``make_data`` (kernels.py), merges
them as weights against the base, and prints per strategy the best and median wall time,
the time spent in ``magnitude_thresholds`` in the best run, the counting passes
(``mag_range`` calls) per merge and a sha256 prefix of the output (equal before and after
a change that must not change bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import make_data

from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.strategies import sparse as sp
from meshmerge.crdt.tensors import TensorSpec

PARAMS: dict[str, dict[str, Any]] = {"ties": {"density": 0.2}, "dare_ties": {"density": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--m", type=int, default=2_500_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("names", nargs="*", default=["model_breadcrumbs", "ties", "dare_ties"])
    args = ap.parse_args()
    base, xs = make_data(args.n, args.m)
    spec = [TensorSpec("w", "F32", (args.m,))]
    inp = MergeInput([{"w": x} for x in xs], [1.0] * args.n, "weights", spec, bytes(32), {"w": base})
    spent = [0.0]
    passes = [0]
    real_thr, real_range = sp.magnitude_thresholds, sp.mag_range

    def thresholds(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real_thr(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t0

    def counting(*a: Any) -> Any:
        passes[0] += 1
        return real_range(*a)

    sp.magnitude_thresholds = thresholds  # type: ignore[assignment]
    sp.mag_range = counting
    for name in args.names:
        strat = strategies.get(name)
        runs = []
        out: Any = None
        for _ in range(args.reps):
            spent[0], passes[0] = 0.0, 0
            t0 = time.perf_counter()
            out = strat.run(inp, PARAMS.get(name, {}))
            runs.append((time.perf_counter() - t0, spent[0], passes[0]))
        best = min(runs)
        digest = hashlib.sha256(np.ascontiguousarray(out["w"]).tobytes()).hexdigest()[:16]
        print(f"{name}: best {best[0] * 1e3:.1f} ms (thresholds {best[1] * 1e3:.1f} ms, {best[2]} counting "
              f"calls), median {np.median([r[0] for r in runs]) * 1e3:.1f} ms, sha256 {digest}, "
              f"N = {args.n}, M = {args.m:,}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
