"""Sparsified task-vector merges: TIES, DARE, DARE-TIES, breadcrumbs.

Task vectors are ``t_k = x_k - b`` (weights with a base) or the delta
contributions themselves; the result is ``b + scaling * merged`` (or the merged
delta). Kernels: :mod:`meshmerge.cext.sparse`.

* ``ties`` — Yadav et al. 2023, "TIES-Merging: Resolving Interference When
  Merging Models": trim each task vector to its top ``density`` fraction by
  magnitude (per tensor; entries tied with the threshold are all kept), elect
  the sign of ``sum_k w_k t_k`` per element, and take the disjoint mean: the
  sum of agreeing ``w_k t_k`` divided by the *sum of the weights* of the
  agreeing entries (so identical inputs come back unchanged at density 1).
* ``dare`` / ``dare_linear`` — Yu et al. 2024, "Language Models are Super Mario":
  drop each entry with probability ``1 - density`` (rounded to a multiple of
  2^-16; counter-based PRNG keyed by seed, tensor, contributor position and
  element index) and rescale kept entries by the inverse keep probability;
  then the weighted average (``normalize``) or sum.
* ``dare_ties`` — DARE's drop-and-rescale followed by TIES' sign election and
  disjoint mean.
* ``breadcrumbs`` / ``model_breadcrumbs`` — Davari & Belilovsky 2024, "Model
  Breadcrumbs": per tensor drop the largest ``gamma`` fraction (outliers) and
  keep the next ``density`` fraction by magnitude, then the weighted sum;
  ``breadcrumbs_ties`` adds the TIES sign election and disjoint mean.

Magnitude thresholds are exact order statistics found by a two-pass radix
selection on float32 bit patterns (no sort, O(1) extra memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import drop_threshold, mag_hist_hi, mag_hist_lo, sparse_merge, stream_key
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights, task_base
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError

SIGN_MODES = ("total", "count")


def magnitude_thresholds(stream: TensorStream, ranks: list[int]) -> npt.NDArray[np.float32]:
    """For each contributor, the float32 value of ``|t_k|`` at each rank (1 = largest).

    Rank 0 gives +inf (nothing is that large). Shape (N, len(ranks)).
    """
    n = len(stream.flats)
    numel = stream.numel
    res = np.full((n, len(ranks)), np.inf, dtype=np.float32)
    real = [r for r in ranks if r > 0]
    if not real or numel == 0:
        return res
    hist = np.zeros((n, 65536), dtype=np.uint64)
    for _lo, _hi, xs, b in stream.chunks():
        stream.check(mag_hist_hi(xs, b, hist))
    target = np.zeros((n, len(ranks)), dtype=np.uint32)
    remaining = np.zeros((n, len(ranks)), dtype=np.int64)
    for k in range(n):
        top = np.cumsum(hist[k, ::-1])
        for j, r in enumerate(ranks):
            if r <= 0:
                continue
            idx = int(np.searchsorted(top, r))
            target[k, j] = 65535 - idx
            remaining[k, j] = r - (int(top[idx - 1]) if idx else 0)
    hist2 = np.zeros((n, len(ranks), 32768), dtype=np.uint64)
    for _lo, _hi, xs, b in stream.chunks():
        mag_hist_lo(xs, b, target, hist2)
    bits = np.zeros((n, len(ranks)), dtype=np.uint32)
    for k in range(n):
        for j, r in enumerate(ranks):
            if r <= 0:
                continue
            top = np.cumsum(hist2[k, j, ::-1])
            idx = int(np.searchsorted(top, remaining[k, j]))
            bits[k, j] = (int(target[k, j]) << 15) | (32767 - idx)
    found = bits.view(np.float32)
    for j, r in enumerate(ranks):
        if r > 0:
            res[:, j] = found[:, j]
    return res


@dataclass(frozen=True)
class _Plan:
    """Everything the sparse kernel needs besides the data."""

    density: float = 1.0
    gamma: float = 0.0
    drop: float = 0.0
    rescale: bool = True
    consensus: int = 0
    disjoint: bool = False
    normalize: bool = False
    scaling: float = 1.0


def sparse_task_merge(inp: MergeInput, plan: _Plan, chunk: int, name: str) -> dict[str, Any]:
    use_base = task_base(inp, name)
    w = checked_weights(inp, positive=True)
    n = len(inp.tensors)
    inv_den = 1.0 / float(w.sum()) if plan.normalize else 1.0
    # Drop rates have 2^-16 resolution; rescale by the exact keep probability realised.
    drop_thr = drop_threshold(plan.drop) if plan.drop > 0.0 else 0
    if drop_thr >= 65536:
        raise StrategyError("density must be at least 2^-16 (the resolution of the drop mask)")
    rescale = 65536.0 / (65536 - drop_thr) if drop_thr and plan.rescale else 1.0
    out: dict[str, Any] = {}
    for spec in inp.specs:
        stream = TensorStream(inp, spec, chunk, base=use_base)
        numel = spec.numel
        lo_thr = np.zeros(n, dtype=np.float32)
        hi_thr = np.full(n, np.inf, dtype=np.float32)
        removed = math.floor(plan.gamma * numel)
        kept = removed + math.ceil(plan.density * numel)
        if plan.density < 1.0 or removed > 0:
            th = magnitude_thresholds(stream, [min(kept, numel) if plan.density < 1.0 else 0, removed])
            if plan.density < 1.0:
                lo_thr = np.ascontiguousarray(th[:, 0])
            hi_thr = np.ascontiguousarray(th[:, 1])
        keys = None
        if drop_thr:
            keys = np.array([stream_key(inp.seed, spec.name, k) for k in range(n)], dtype=np.uint64)
        flat = np.empty(numel, dtype=np.float32)
        for lo, hi, xs, b in stream.chunks():
            bad = sparse_merge(
                xs, b, w, lo_thr, hi_thr, keys, drop_thr, rescale,
                plan.consensus, plan.disjoint, inv_den, plan.scaling, lo, flat[lo:hi],
            )
            stream.check(bad)
        out[spec.name] = stream.finish(flat)
    return out


@dataclass(frozen=True)
class TiesParams(Params):
    """density: fraction of each task vector kept (by magnitude); scaling: lam on the merged
    task vector; majority_sign: 'total' (sign of the weighted sum) or 'count' (sign vote)."""

    density: float = 0.2
    scaling: float = 1.0
    majority_sign: str = "total"

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._number("scaling", -1e6, 1e6)
        self._choice("majority_sign", SIGN_MODES)


class Ties(Strategy):
    name = "ties"
    params_type = TiesParams

    def merge(self, inp: MergeInput, params: TiesParams, chunk: int) -> dict[str, Any]:
        plan = _Plan(
            density=params.density, consensus=1 + SIGN_MODES.index(params.majority_sign),
            disjoint=True, scaling=params.scaling,
        )
        return sparse_task_merge(inp, plan, chunk, self.name)


@dataclass(frozen=True)
class DareParams(Params):
    """density: keep probability of each entry; rescale: divide kept entries by density;
    normalize: divide the weighted sum by the total weight; scaling: lam."""

    density: float = 0.5
    rescale: bool = True
    normalize: bool = True
    scaling: float = 1.0

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._boolean("rescale")
        self._boolean("normalize")
        self._number("scaling", -1e6, 1e6)


class Dare(Strategy):
    name = "dare"
    params_type = DareParams

    def merge(self, inp: MergeInput, params: DareParams, chunk: int) -> dict[str, Any]:
        plan = _Plan(
            drop=1.0 - params.density, rescale=params.rescale,
            normalize=params.normalize, scaling=params.scaling,
        )
        return sparse_task_merge(inp, plan, chunk, self.name)


@dataclass(frozen=True)
class DareTiesParams(Params):
    """density: keep probability; rescale: divide kept by density; majority_sign; scaling."""

    density: float = 0.5
    rescale: bool = True
    majority_sign: str = "total"
    scaling: float = 1.0

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._boolean("rescale")
        self._choice("majority_sign", SIGN_MODES)
        self._number("scaling", -1e6, 1e6)


class DareTies(Strategy):
    name = "dare_ties"
    params_type = DareTiesParams

    def merge(self, inp: MergeInput, params: DareTiesParams, chunk: int) -> dict[str, Any]:
        plan = _Plan(
            drop=1.0 - params.density, rescale=params.rescale,
            consensus=1 + SIGN_MODES.index(params.majority_sign), disjoint=True, scaling=params.scaling,
        )
        return sparse_task_merge(inp, plan, chunk, self.name)


@dataclass(frozen=True)
class BreadcrumbsParams(Params):
    """density: fraction kept below the outliers; gamma: fraction of largest magnitudes removed;
    normalize: divide by the total weight; scaling: lam."""

    density: float = 0.9
    gamma: float = 0.01
    normalize: bool = True
    scaling: float = 1.0

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._number("gamma", 0.0, 1.0, hi_open=True)
        if self.density + self.gamma > 1.0:
            raise StrategyError(f"density + gamma must be <= 1, got {self.density} + {self.gamma}")
        self._boolean("normalize")
        self._number("scaling", -1e6, 1e6)


class Breadcrumbs(Strategy):
    name = "breadcrumbs"
    params_type = BreadcrumbsParams

    def merge(self, inp: MergeInput, params: BreadcrumbsParams, chunk: int) -> dict[str, Any]:
        plan = _Plan(
            density=params.density, gamma=params.gamma, normalize=params.normalize, scaling=params.scaling,
        )
        return sparse_task_merge(inp, plan, chunk, self.name)


@dataclass(frozen=True)
class BreadcrumbsTiesParams(Params):
    density: float = 0.9
    gamma: float = 0.01
    majority_sign: str = "total"
    scaling: float = 1.0

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._number("gamma", 0.0, 1.0, hi_open=True)
        if self.density + self.gamma > 1.0:
            raise StrategyError(f"density + gamma must be <= 1, got {self.density} + {self.gamma}")
        self._choice("majority_sign", SIGN_MODES)
        self._number("scaling", -1e6, 1e6)


class BreadcrumbsTies(Strategy):
    name = "breadcrumbs_ties"
    params_type = BreadcrumbsTiesParams

    def merge(self, inp: MergeInput, params: BreadcrumbsTiesParams, chunk: int) -> dict[str, Any]:
        plan = _Plan(
            density=params.density, gamma=params.gamma,
            consensus=1 + SIGN_MODES.index(params.majority_sign), disjoint=True, scaling=params.scaling,
        )
        return sparse_task_merge(inp, plan, chunk, self.name)
