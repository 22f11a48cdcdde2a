"""Time mergekit's merge methods on CPU torch (run by kernels.py inside .bench-venv).

Builds the same inputs as kernels.make_data (same numpy generator and seed),
prints one JSON line: {operation: best seconds of 1 run}.
Usage: _mergekit_runner.py N M op1,op2,...
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from mergekit.merge_methods.api import merge_tensors

SEED = 20261123
DENSITY = 0.2
DARE_DENSITY = 0.5


def main() -> None:
    n, m = int(sys.argv[1]), int(sys.argv[2])
    ops = sys.argv[3].split(",")
    rng = np.random.default_rng(SEED)
    base = rng.standard_normal(m, dtype=np.float32)
    xs = []
    for _ in range(n):
        d = rng.standard_normal(m, dtype=np.float32)
        d *= np.float32(0.01)
        d += base
        xs.append(torch.from_numpy(d))
    tb = torch.from_numpy(base)
    with_base = [tb, *xs]
    ones = [1.0] * n
    calls = {
        "linear": lambda: merge_tensors(xs, "linear", parameters={"weight": ones}),
        "ties": lambda: merge_tensors(
            with_base, "ties", base_index=0, parameters={"weight": ones, "density": DENSITY}
        ),
        "dare": lambda: merge_tensors(
            with_base, "dare_linear", base_index=0,
            parameters={"weight": ones, "density": DARE_DENSITY},
        ),
        "dare_ties": lambda: merge_tensors(
            with_base, "dare_ties", base_index=0,
            parameters={"weight": ones, "density": DARE_DENSITY},
        ),
        "slerp (pair)": lambda: merge_tensors(xs[:2], "slerp", base_index=0, parameters={"t": 0.5}),
        "karcher (multi)": lambda: merge_tensors(xs, "karcher"),
    }
    out: dict[str, object] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for op in ops:
        if op not in calls:
            continue
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                calls[op]()
                out[op] = time.perf_counter() - t0
        except Exception as e:  # report, don't hide: the table shows the reason
            out[op] = f"error: {type(e).__name__}: {str(e)[:120]}"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
