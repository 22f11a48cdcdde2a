"""Strategies whose defining inputs contributions do not carry.

They are registered under their usual names so that asking for one gives a
clear explanation instead of an "unknown strategy" error or a silent
substitute. A merge here is a pure function of the signed contributions, so a
method that needs data, activations or gradient steps at merge time cannot
run as defined; SVD-based methods wait for a deterministic SVD kernel.
(Data-driven methods with a data-free proxy live in :mod:`.datafree`.)
"""

from __future__ import annotations

from typing import Any, ClassVar

from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


class Unsupported(Strategy):
    reason: ClassVar[str] = ""
    kinds = frozenset({"weights", "delta", "lora"})

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        raise StrategyError(f"{self.name} cannot run here: {self.reason}")


def unsupported(name: str, reason: str) -> Unsupported:
    cls: type[Unsupported] = type(f"Unsupported_{name}", (Unsupported,), {"name": name, "reason": reason})
    return cls()


_SVD = (
    "it needs singular value decompositions, and LAPACK/BLAS SVDs differ in the last bits between "
    "builds and CPUs, which would break byte-identical merges across replicas; meshmerge has no "
    "deterministic SVD kernel yet"
)

UNSUPPORTED = [
    unsupported("star", "STAR (spectral truncation and rescale, Lee et al. 2025): " + _SVD),
    unsupported(
        "svd_knot_tying", "KnOTS (Stoica et al. 2025) aligns LoRA updates in a joint SVD basis: " + _SVD
    ),
    unsupported("dual_projection", "dual-projection merging projects updates onto SVD subspaces: " + _SVD),
    unsupported(
        "adarank",
        "AdaRank (Lee et al. 2025) picks singular components by test-time entropy minimisation on data, "
        "which the merge layer does not have",
    ),
]
