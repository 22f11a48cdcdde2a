"""Linear strategies: weighted average, task arithmetic, task negation.

* ``linear`` / ``weight_average`` — model soups / FedAvg (Wortsman et al.
  2022; McMahan et al. 2017): ``sum_k w_k x_k / sum_k w_k``.
* ``task_arithmetic`` — Ilharco et al. 2023, "Editing models with task
  arithmetic": ``b + lam * sum_k w_k (x_k - b)`` (divided by ``sum w`` if
  ``normalize``).
* ``negative_merge`` — task negation from the same paper: ``b - lam * sum_k
  w_k (x_k - b)``, to remove what the contributions taught.

All accumulate in float64 in canonical order and round once to the storage
dtype (16-bit inputs are widened exactly to float32 first). Float32 tensors go
to the kernel in one call (see :func:`in_place_chunk`) and the output is a
huge-page backed array (:mod:`meshmerge.cext.outbuf`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import weighted_sum_f32
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._combine import _task_chunk
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights, in_place_chunk, task_base
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


@dataclass(frozen=True)
class LinearParams(Params):
    """normalize: divide by the total weight (True) or return the plain weighted sum."""

    normalize: bool = True

    def validate(self) -> None:
        self._boolean("normalize")


def normalized_weights(inp: MergeInput, normalize: bool) -> npt.NDArray[np.float64]:
    w = checked_weights(inp)
    if not normalize:
        return w
    total = float(w.sum())
    if total == 0.0:
        raise StrategyError("total contribution weight is zero: nothing to average")
    return w / total


def weighted_average(inp: MergeInput, weights: npt.NDArray[np.float64], chunk: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in inp.specs:
        stream = TensorStream(inp, spec, in_place_chunk(spec, chunk))
        flat_out = empty_f32(spec.numel)
        for lo, hi, xs, _ in stream.chunks():
            stream.check(weighted_sum_f32(xs, weights, flat_out[lo:hi]))
        out[spec.name] = stream.finish(flat_out)
    return out


class Linear(Strategy):
    """Weighted average of the contributions (any kind; LoRA factors are averaged factor-wise)."""

    name = "linear"
    kinds = frozenset({"weights", "delta", "lora"})
    params_type = LinearParams

    def merge(self, inp: MergeInput, params: LinearParams, chunk: int) -> dict[str, Any]:
        return weighted_average(inp, normalized_weights(inp, params.normalize), chunk)


@dataclass(frozen=True)
class TaskArithmeticParams(Params):
    """scaling: lam, the factor on the summed task vectors; normalize: divide by sum of weights."""

    scaling: float = 1.0
    normalize: bool = False

    def validate(self) -> None:
        self._number("scaling", -1e6, 1e6)
        self._boolean("normalize")


def task_sum(inp: MergeInput, lam: float, normalize: bool, chunk: int, name: str) -> dict[str, Any]:
    use_base = task_base(inp, name)
    w = checked_weights(inp)
    inv_den = 1.0
    if normalize:
        total = float(w.sum())
        if total == 0.0:
            raise StrategyError("total contribution weight is zero: cannot normalize")
        inv_den = 1.0 / total
    out: dict[str, Any] = {}
    for spec in inp.specs:
        stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=use_base)
        flat = empty_f32(spec.numel)
        for lo, hi, xs, b in stream.chunks():
            stream.check(_task_chunk(xs, b, w, flat[lo:hi], lam=lam, inv_den=inv_den))
        out[spec.name] = stream.finish(flat)
    return out


class TaskArithmetic(Strategy):
    """``b + scaling * sum_k w_k (x_k - b)``; for delta contributions the merged delta."""

    name = "task_arithmetic"
    params_type = TaskArithmeticParams

    def merge(self, inp: MergeInput, params: TaskArithmeticParams, chunk: int) -> dict[str, Any]:
        return task_sum(inp, params.scaling, params.normalize, chunk, self.name)


class NegativeMerge(Strategy):
    """Task negation: ``b - scaling * sum_k w_k (x_k - b)``."""

    name = "negative_merge"
    params_type = TaskArithmeticParams

    def merge(self, inp: MergeInput, params: TaskArithmeticParams, chunk: int) -> dict[str, Any]:
        return task_sum(inp, -params.scaling, params.normalize, chunk, self.name)
