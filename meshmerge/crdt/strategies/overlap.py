"""Merges that treat an element by how many contributors changed it: RAM, RAM+.

Kernels: :mod:`meshmerge.cext.overlap`. Task vectors are ``t_k = x_k - b``
(weights with a base) or the delta contributions; an entry *contributes* when
``|t_k| > epsilon``.

* ``ram`` — Reinforced Agent Merging (mergekit's ``ram``, arXiv 2601.13572):
  per element, an entry only one contributor changed is kept as is, entries
  several contributors changed are averaged over those contributors (not over
  all N, which would dilute them), and elements nobody changed keep the base:
  ``out = b + (t_sole`` or ``sum w_k t_k / sum w_k`` over the contributing k``)``.
  mergekit averages with equal weights; ours uses the contribution weights,
  which gives the same value when they are equal.
* ``ramplus_tl`` — RAM+ tensor-local: per tensor and contributor, ``rho_k`` =
  (its shared contributing entries) / max(its sole ones, epsilon), and its sole
  entries are scaled by ``lambda_k = 1 + r * clamp(rho_k, 0, alpha)`` (a
  contributor whose changes mostly overlap with others' gets its unique changes
  reinforced); shared entries as in ``ram``. Needs one counting pass per tensor
  before the merge pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshmerge.cext import overlap_counts, overlap_merge
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights, in_place_chunk, task_base
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy


@dataclass(frozen=True)
class RamParams(Params):
    """epsilon: an entry contributes when its task-vector magnitude is above this."""

    epsilon: float = 1e-5

    def validate(self) -> None:
        self._number("epsilon", 0.0, 1e6)


@dataclass(frozen=True)
class RamPlusParams(Params):
    """r: strength of the reinforcement; alpha: cap on the overlap ratio rho; epsilon as in ram."""

    r: float = 0.1
    alpha: float = 0.2
    epsilon: float = 1e-5

    def validate(self) -> None:
        self._number("r", 0.0, 1e6)
        self._number("alpha", 0.0, 1e6)
        self._number("epsilon", 0.0, 1e6)


def reinforcement(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    """``1 + r * clamp(shared / max(unique, epsilon), 0, alpha)``; no sole entries and
    some shared ones (with epsilon 0) is an unbounded ratio, so the cap."""
    den = max(float(unique), epsilon)
    rho = shared / den if den > 0.0 else (math.inf if shared else 0.0)
    return 1.0 + r * min(max(rho, 0.0), alpha)


def _ram(inp: MergeInput, name: str, epsilon: float, plus: RamPlusParams | None, chunk: int) -> dict[str, Any]:
    use_base = task_base(inp, name)
    w = checked_weights(inp, positive=True)
    n = len(inp.tensors)
    out: dict[str, Any] = {}
    for spec in inp.specs:
        stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=use_base)
        lam = np.ones(n)
        if plus is not None:
            shared = np.zeros(n, dtype=np.int64)
            unique = np.zeros(n, dtype=np.int64)
            for _lo, _hi, xs, b in stream.chunks():
                stream.check(overlap_counts(xs, b, epsilon, shared, unique))
            lam = np.array([reinforcement(int(s), int(u), plus.r, plus.alpha, epsilon)
                            for s, u in zip(shared, unique, strict=True)])
        flat = empty_f32(spec.numel)
        for lo, hi, xs, b in stream.chunks():
            stream.check(overlap_merge(xs, b, w, lam, epsilon, flat[lo:hi]))
        out[spec.name] = stream.finish(flat)
    return out


class Ram(Strategy):
    name = "ram"
    params_type = RamParams

    def merge(self, inp: MergeInput, params: RamParams, chunk: int) -> dict[str, Any]:
        return _ram(inp, self.name, params.epsilon, None, chunk)


class RamPlus(Strategy):
    name = "ramplus_tl"
    params_type = RamPlusParams

    def merge(self, inp: MergeInput, params: RamPlusParams, chunk: int) -> dict[str, Any]:
        return _ram(inp, self.name, params.epsilon, params, chunk)
