"""Tiny helpers shared by the benchmark scripts: timing and Markdown tables."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence


def median_seconds(fn: Callable[[], object], *, repeat: int = 5, number: int = 1) -> float:
    """Median over `repeat` runs of the time per call of `fn` (called `number` times a run)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import os

    return f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, {platform.machine()}"
