"""Cyclic-GC settings for a long-lived node process, and a pause recorder to check them.

Why: a node that has finished start-up holds tens of thousands of long-lived
objects (libp2p and protobuf modules, the peerstore, Cython kernels, caches).
CPython's default thresholds (700, 10, 10) run a young collection every ~700
allocations and walk those survivors again on every older collection, while a
gossip message allocates dozens of short-lived objects (frames, RPC objects,
coroutines). ``gc.freeze()`` moves what start-up built into the permanent
generation, which collections never scan; higher thresholds make collections
rarer. Reference counting still frees almost everything at once; only cycles
wait for a collection, and the thresholds below still collect them within a
few tens of thousands of allocations.

:class:`GcPauses` hooks ``gc.callbacks`` to measure how long each collection
takes, so the tuning can be checked under load (the gossip benchmark reports it).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GcParams", "GcPauses", "tune_gc"]


@dataclass(frozen=True)
class GcParams:
    """Thresholds for ``gc.set_threshold``; ``freeze`` moves start-up objects out of reach."""

    threshold0: int = 50_000
    """Allocations minus deallocations that trigger a young (generation 0) collection."""
    threshold1: int = 20
    """Young collections per generation-1 collection."""
    threshold2: int = 100
    """Generation-1 collections per full collection (CPython also waits for 25 % growth)."""
    freeze: bool = True
    """Call ``gc.freeze()`` once start-up is done (objects alive then are never scanned again)."""

    def validate(self) -> None:
        for name in ("threshold0", "threshold1", "threshold2"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000_000:
                raise ValueError(f"GcParams.{name}: must be an integer in [1, 10000000], got {value!r}")


def tune_gc(params: GcParams | None = None) -> None:
    """Apply ``params`` to this process; call it after start-up, before serving traffic."""
    params = params or GcParams()
    params.validate()
    if params.freeze:
        gc.collect()  # free start-up garbage first so it is not frozen for the process lifetime
        gc.freeze()
    gc.set_threshold(params.threshold0, params.threshold1, params.threshold2)


@dataclass
class GcPauses:
    """Count and duration of collections per generation, from ``gc.callbacks``."""

    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    total_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    max_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _started: float = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = int(info.get("generation", 0))
        took = time.perf_counter() - self._started
        self.counts[gen] += 1
        self.total_s[gen] += took
        if took > self.max_s[gen]:
            self.max_s[gen] = took

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def reset(self) -> None:
        self.counts = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    def summary(self) -> dict[str, list[float]]:
        """``{"count": [...], "total_ms": [...], "max_ms": [...]}`` per generation."""
        return {
            "count": [float(c) for c in self.counts],
            "total_ms": [round(1e3 * t, 3) for t in self.total_s],
            "max_ms": [round(1e3 * t, 3) for t in self.max_s],
        }
