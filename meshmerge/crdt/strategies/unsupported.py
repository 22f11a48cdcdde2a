"""Strategies whose defining inputs contributions do not carry.

They are registered under their usual names so that asking for one gives a
clear explanation instead of an "unknown strategy" error or a silent
substitute. A merge here is a pure function of the signed contributions, so a
method that needs data, activations or gradient steps at merge time cannot
run as defined; one name has no definition precise enough to implement.
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


UNSUPPORTED = [
    unsupported(
        "split_unlearn_merge",
        "its only available description (crdt-merge: split parameters by magnitude, unlearn a targeted "
        "fraction, merge the rest) does not define what is unlearned, so there is no honest definition "
        "to implement; use negative_merge for task negation",
    ),
    unsupported(
        "regression_mean",
        "RegMean (Jin et al. 2023) solves a least-squares problem with the Gram matrices of each "
        "layer's input activations, which contributions do not carry",
    ),
    unsupported(
        "ada_merging",
        "AdaMerging (Yang et al. 2024) learns merge coefficients by entropy minimisation on unlabeled "
        "test data, which the merge layer does not have",
    ),
    unsupported(
        "representation_surgery",
        "Representation Surgery (Yang et al. 2024) trains a module on the merged model's representations "
        "of task data, which the merge layer does not have",
    ),
    unsupported(
        "dam",
        "DAM (Gauthier-Caron et al. 2024) learns per-feature scaling coefficients by gradient descent "
        "on data, which the merge layer does not have",
    ),
]
