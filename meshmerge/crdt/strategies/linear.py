"""Weighted linear averaging: out = sum_k w_k x_k / sum_k w_k.

Accumulates in float64 in canonical order (see ``meshmerge.cext.linear``),
rounds once to the storage dtype. Streams each tensor in chunks so peak memory
is the output plus a few chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import weighted_sum_f32
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError
from meshmerge.crdt.tensors import from_f32, to_f32

CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LinearParams(Params):
    """normalize: divide by the total weight (True) or return the plain weighted sum."""

    normalize: bool = True

    def validate(self) -> None:
        if not isinstance(self.normalize, bool):
            raise StrategyError("normalize must be a boolean")


def normalized_weights(inp: MergeInput, normalize: bool) -> npt.NDArray[np.float64]:
    w = inp.weight_array()
    if not np.all(np.isfinite(w)):
        raise StrategyError("contribution weights must be finite")
    if not normalize:
        return w
    total = float(w.sum())
    if total == 0.0:
        raise StrategyError("total contribution weight is zero: nothing to average")
    return w / total


def weighted_average(inp: MergeInput, weights: npt.NDArray[np.float64]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in inp.specs:
        flat_out = np.empty(spec.numel, dtype=np.float32)
        flats = [np.asarray(t[spec.name]).reshape(-1) for t in inp.tensors]
        for lo in range(0, spec.numel, CHUNK_ELEMENTS):
            hi = min(lo + CHUNK_ELEMENTS, spec.numel)
            chunks = [np.ascontiguousarray(to_f32(f[lo:hi], spec.dtype)) for f in flats]
            weighted_sum_f32(chunks, weights, flat_out[lo:hi])
        out[spec.name] = from_f32(flat_out, spec.dtype).reshape(spec.shape)
    return out


class Linear(Strategy):
    name = "linear"
    kinds = frozenset({"weights", "delta", "lora"})
    params_type = LinearParams

    def merge(self, inp: MergeInput, params: LinearParams) -> dict[str, Any]:
        return weighted_average(inp, normalized_weights(inp, params.normalize))
