"""How many threads the merge kernels may use.

Kernels split a chunk into disjoint, contiguous element ranges, one per
thread; every element is reduced over the contributions in the same order
whatever the split, so the merged bytes never depend on the thread count
(tests check 1, 2 and 3 threads). The count only trades CPU for wall time.

Default: ``MESHMERGE_THREADS`` if set, else the CPUs this process may run on.
A range is only split off when it holds at least ``grain`` elements, so small
tensors do not pay for waking threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "MESHMERGE_THREADS"
MAX_THREADS = 256
DEFAULT_GRAIN = 1 << 16

_threads: int | None = None
_grain: int = DEFAULT_GRAIN


def _from_env() -> int:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        try:
            return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))
        except (AttributeError, OSError):
            return max(1, min(MAX_THREADS, os.cpu_count() or 1))
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be an integer in [1, {MAX_THREADS}], got {raw!r}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{ENV} must be an integer in [1, {MAX_THREADS}], got {raw!r}")
    return n


def get_threads() -> int:
    """Threads a kernel call may use (set_threads value, else the environment)."""
    global _threads
    if _threads is None:
        _threads = _from_env()
    return _threads


def get_grain() -> int:
    """Fewest elements a thread's range may hold."""
    return _grain


def set_threads(threads: int | None = None, *, grain: int | None = None) -> None:
    """Set the kernel thread count (None: back to the environment default) and optionally the grain."""
    global _threads, _grain
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    if grain is not None and (isinstance(grain, bool) or not isinstance(grain, int) or grain < 1):
        raise ValueError(f"grain must be a positive integer, got {grain!r}")
    _threads = threads
    if grain is not None:
        _grain = grain


@contextmanager
def using_threads(threads: int, *, grain: int | None = None) -> Iterator[None]:
    """Run a block with a given thread count (and grain), restoring the previous settings."""
    old_threads, old_grain = _threads, _grain
    set_threads(threads, grain=grain)
    try:
        yield
    finally:
        set_threads(old_threads, grain=old_grain)
