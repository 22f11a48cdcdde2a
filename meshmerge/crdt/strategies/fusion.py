"""Arcee Fusion (mergekit's ``arcee_fusion``): fuse a model's important changes into the base.

Per tensor, with ``x`` the one contribution and ``b`` the base (both widened
to float32, rows along the last axis):

* ``kl[row] = sum_i p_i log(p_i / q_i)`` with ``p = softmax(x[row]) + 1e-8``,
  ``q = softmax(b[row]) + 1e-8`` (:func:`meshmerge.cext.fusion.softmax_kl_rows`,
  float64, our own exp/log, so every replica gets the same bits);
* importance ``s_i = |x_i - b_i| * kl[row]`` (float64);
* threshold = median + 1.5 * (Q3 - Q1) of ``s``, where the quantile ``q`` is the
  element of rank ``floor(q * (n - 1))`` in ascending order (exact order
  statistics; mergekit estimates them from a random sample above 1M elements,
  so its masks differ between runs);
* ``out = x`` where ``s >= threshold``, else ``b`` (the stored values, so kept
  entries are the model's exact bits).

Defined for exactly one contribution of kind ``weights`` plus the base model,
as in mergekit. Memory: one float64 importance value per element of the
largest tensor, on top of the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import has_nonfinite
from meshmerge.cext.fusion import softmax_kl_rows
from meshmerge.crdt.strategies._stream import TensorStream
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError
from meshmerge.crdt.tensors import to_f32


def fusion_threshold(importance: npt.NDArray[np.float64]) -> float:
    """median + 1.5 IQR of the importance values, from exact order statistics."""
    n = importance.size
    ranks = [(n - 1) // 4, (n - 1) // 2, 3 * (n - 1) // 4]
    q1, med, q3 = (float(v) for v in np.partition(importance, ranks)[ranks])
    return med + 1.5 * (q3 - q1)


class ArceeFusion(Strategy):
    name = "arcee_fusion"
    kinds = frozenset({"weights"})
    params_type = Params

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        if len(inp.tensors) != 1:
            raise StrategyError(
                f"arcee_fusion fuses exactly one contribution into the base model, got {len(inp.tensors)}"
            )
        out: dict[str, Any] = {}
        for spec in inp.specs:
            stream = TensorStream(inp, spec, chunk, base=True)
            xs, bs = stream.flats[0], stream.base
            assert bs is not None
            x = np.ascontiguousarray(to_f32(xs, spec.dtype), dtype=np.float32)
            b = np.ascontiguousarray(to_f32(bs, spec.dtype), dtype=np.float32)
            if has_nonfinite(x):
                raise StrategyError(f"contribution 0 tensor {spec.name!r} holds NaN or Inf; "
                                    "non-finite contributions cannot be merged")
            if has_nonfinite(b):
                raise StrategyError(f"base model tensor {spec.name!r} holds NaN or Inf")
            if spec.numel == 0:
                out[spec.name] = xs.reshape(spec.shape).copy()
                continue
            cols = spec.shape[-1] if spec.shape else 1
            rows = spec.numel // cols
            kl = softmax_kl_rows(x.reshape(rows, cols), b.reshape(rows, cols))
            diff = np.abs(x.astype(np.float64) - b.astype(np.float64)).reshape(rows, cols)
            diff *= kl[:, None]
            importance = diff.reshape(-1)
            keep = importance >= fusion_threshold(importance)
            out[spec.name] = np.where(keep, xs, bs).reshape(spec.shape)
        return out
