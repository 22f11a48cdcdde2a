"""Wall seconds of single strategies on the kernels benchmark inputs.

A quick before/after tool for one kernel change: builds N float32 variants of
M parameters with ``make_data`` from ``kernels.py`` (same seed) and times
``strategies.get(name).run(inp, params)`` (best of ``--repeat``). Strategies
that take exactly one contribution (nearswap) get the first variant only.

    nice .venv/bin/python scripts/bench/strategy_seconds.py --n 16 --m 2500000 sce nearswap led_merge
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import machine, table
from kernels import make_data

from meshmerge.cext import get_threads
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.tensors import TensorSpec

ONE_INPUT = {"nearswap", "passthrough"}
DEFAULT = ("sce", "nearswap", "led_merge")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(DEFAULT))
    ap.add_argument("--n", type=int, default=16, help="contributions")
    ap.add_argument("--m", type=int, default=2_500_000, help="float32 parameters per contribution")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--params", default="{}", help="JSON object: name -> params")
    args = ap.parse_args()
    params = json.loads(args.params)
    base, xs = make_data(args.n, args.m)
    spec = [TensorSpec("w", "F32", (args.m,))]
    rows = []
    for name in args.names:
        use = xs[:1] if name in ONE_INPUT else xs
        inp = MergeInput([{"w": x} for x in use], [1.0] * len(use), "weights", spec, bytes(32), {"w": base})
        strat = strategies.get(name)
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            strat.run(inp, params.get(name, {}))
            best = min(best, time.perf_counter() - t0)
        gbs = len(use) * args.m * 4 / best / 1e9
        rows.append([name, len(use), f"{args.m:,}", best, gbs])
    print(f"{machine()}; kernel threads {get_threads()}; load {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(table(["strategy", "N", "M", "seconds", "GB/s read"], rows))


if __name__ == "__main__":
    main()
