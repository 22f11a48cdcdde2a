"""Elementwise strategies: EMR elect, DELLA, nearswap, passthrough.

EMR, DELLA and safe_merge run in :mod:`meshmerge.cext.elemwise`, SCE, nearswap
and led_merge in :mod:`meshmerge.cext.selective`; both perform exactly the
float64 operations written below in the same order (a stable radix sort gives
DELLA's ranks). Elementwise ``+ - * /``, ``abs``,
``maximum`` and comparisons are exactly rounded / exact, and every sum runs
over contributors in canonical order, so the bytes are the same on every
replica and for every chunk size and thread count.

* ``emr`` — the task-independent "elect" step of EMR-Merging (Huang et al.
  2024, "EMR-Merging: Tuning-Free High-Performance Model Merging"): sign of
  ``sum_k t_k``; magnitude ``max |t_k|`` over the entries with that sign;
  ``out = b + scaling * sign * magnitude``. EMR's per-task masks and rescalers
  need the task identity at inference time and are not produced.
* ``della`` / ``della_linear`` — DELLA-Merging (Deep, Bhardwaj, Zeng 2024),
  MagPrune: within each row (last axis) entries are ranked by ``|t|``; the
  entry of rank r (0 = smallest) of n is kept with probability
  ``density + epsilon * (2 r / (n - 1) - 1)`` (so larger entries are kept more
  often) and rescaled by the inverse of that probability; then TIES' sign
  election and disjoint mean (``della``) or the weighted sum (``della_linear``).
  Draws: 16-bit lanes of the same counter-based PRNG as DARE; keep iff
  ``lane < round(p * 65536)``.
* ``nearswap`` — mergekit's nearswap: one contribution x and the base b,
  ``w = clip(t / |b - x|, 0, 1)`` (1 where they are equal) and
  ``out = w x + (1 - w) b``: take x where it is near the base. In float64:
  ``d = x - b``, ``w = 1`` where ``d == 0`` else ``min(1, t / |d|)``,
  ``out = float32(w (d + b) + (1 - w) b)``.
* ``passthrough`` — exactly one contribution, returned unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import (
    EXACT_LIMBS,
    della_merge,
    emr_elect,
    exact_round,
    has_nonfinite,
    kth_smallest_nonnegative,
    led_select,
    nearswap_merge,
    safe_freeze,
    safe_moments,
    sce_combine,
    sce_energy,
    sce_variance,
    stream_key,
)
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._stream import (
    TensorStream,
    checked_weights,
    in_place_chunk,
    task_base,
    to_storage,
)
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError

F64 = npt.NDArray[np.float64]


def _check_finite(stream: TensorStream, xs: list[npt.NDArray[np.float32]]) -> None:
    """Raise for the first contribution whose chunk holds NaN or Inf."""
    for k, x in enumerate(xs):
        if has_nonfinite(x):
            stream.check(k)


@dataclass(frozen=True)
class EmrParams(Params):
    """scaling: factor on the elected task vector."""

    scaling: float = 1.0

    def validate(self) -> None:
        self._number("scaling", -1e6, 1e6)


class Emr(Strategy):
    name = "emr"
    params_type = EmrParams

    def merge(self, inp: MergeInput, params: EmrParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            flat = empty_f32(spec.numel)
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=use_base)
            for lo, hi, xs, b in stream.chunks():
                stream.check(emr_elect(xs, b, params.scaling, flat[lo:hi]))
            out[spec.name] = stream.finish(flat)
        return out


@dataclass(frozen=True)
class DellaParams(Params):
    """density: mean keep probability; epsilon: spread of keep probabilities across ranks;
    scaling: lam; majority_sign: 'total' or 'count' (della only)."""

    density: float = 0.5
    epsilon: float = 0.1
    scaling: float = 1.0
    majority_sign: str = "total"

    def validate(self) -> None:
        self._number("density", 0.0, 1.0, lo_open=True)
        self._number("epsilon", 0.0, 1.0)
        if self.density - self.epsilon <= 0.0 or self.density + self.epsilon > 1.0:
            raise StrategyError(
                "density - epsilon must be > 0 and density + epsilon <= 1, "
                f"got {self.density}, {self.epsilon}"
            )
        self._number("scaling", -1e6, 1e6)
        self._choice("majority_sign", ("total", "count"))


class Della(Strategy):
    name = "della"
    params_type = DellaParams
    consensus = True

    def merge(self, inp: MergeInput, params: DellaParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        w = checked_weights(inp, positive=True)
        total_w = math.fsum(float(x) for x in w)
        consensus = (1 if params.majority_sign == "total" else 2) if self.consensus else 0
        out: dict[str, Any] = {}
        for spec in inp.specs:
            cols = spec.shape[-1] if spec.shape else 1
            # Ranks are per row (last axis), so chunks hold whole rows.
            step = max(1, chunk // cols) * cols if cols else chunk
            flat = np.zeros(spec.numel, dtype=np.float32)
            keys = np.array([stream_key(inp.seed, spec.name, k) for k in range(len(inp.tensors))],
                            dtype=np.uint64)
            stream = TensorStream(inp, spec, step, base=use_base)
            for lo, hi, xs, b in stream.chunks():
                _check_finite(stream, xs)
                della_merge(xs, b, w, keys, cols, lo, params.density, params.epsilon, consensus,
                            1.0 / total_w, params.scaling, flat[lo:hi])
            out[spec.name] = to_storage(flat, spec)
        return out


class DellaLinear(Della):
    name = "della_linear"
    consensus = False


@dataclass(frozen=True)
class NearswapParams(Params):
    """t: distance scale; entries closer to the base than t are taken from the contribution."""

    t: float = 1e-3

    def validate(self) -> None:
        self._number("t", 0.0, 1e30, lo_open=True)


class Nearswap(Strategy):
    name = "nearswap"
    params_type = NearswapParams
    kinds = frozenset({"weights"})

    def merge(self, inp: MergeInput, params: NearswapParams, chunk: int) -> dict[str, Any]:
        if len(inp.tensors) != 1:
            raise StrategyError(
                f"nearswap takes exactly one contribution and the base, got {len(inp.tensors)}"
            )
        task_base(inp, self.name)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            flat = np.empty(spec.numel, dtype=np.float32)
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=True)
            for lo, hi, xs, b in stream.chunks():
                stream.check(nearswap_merge(xs[0], b, params.t, flat[lo:hi]))
            out[spec.name] = stream.finish(flat)
        return out


class Passthrough(Strategy):
    name = "passthrough"
    kinds = frozenset({"weights", "delta", "lora"})

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        if len(inp.tensors) != 1:
            raise StrategyError(f"passthrough takes exactly one contribution, got {len(inp.tensors)}")
        out: dict[str, Any] = {}
        for spec in inp.specs:
            stream = TensorStream(inp, spec, chunk)
            for _lo, _hi, xs, _ in stream.chunks():
                if not np.all(np.isfinite(xs[0])):
                    stream.check(0)
            out[spec.name] = np.array(stream.flats[0]).reshape(spec.shape)
        return out


class LedMerge(Strategy):
    """Per element, the contribution value closest to the weighted mean (crdt-merge's
    ``led_merge``, "layer-wise evaluation-driven" best-source selection without an
    evaluator): a coordinate-wise medoid that never invents a value. Ties go to the
    smaller value, so the choice does not depend on arrival order. In float64:
    ``mean = sum_k wn_k x_k`` (k in order, ``wn = w / sum w``), distances ``|x_k - mean|``."""

    name = "led_merge"
    kinds = frozenset({"weights", "delta"})

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp, positive=True)
        wn = np.ascontiguousarray(w / float(w.sum()), dtype=np.float64)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            flat = np.empty(spec.numel, dtype=np.float32)
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk))
            for lo, hi, xs, _b in stream.chunks():
                stream.check(led_select(xs, wn, flat[lo:hi]))
            out[spec.name] = stream.finish(flat)
        return out


@dataclass(frozen=True)
class SafeMergeParams(Params):
    """fraction: share of each tensor's entries (highest variance across contributions) that
    keep the base model's value."""

    fraction: float = 0.1

    def validate(self) -> None:
        self._number("fraction", 0.0, 1.0)


class SafeMerge(Strategy):
    """crdt-merge's ``safe_merge`` idea: entries where the contributions disagree most
    (highest weighted variance of the task values, the top ``fraction`` per tensor; ties at
    the threshold all count; zero variance never does) are treated as safety-critical and
    keep the base value; the rest is the weighted average. Per element, in float64 and
    contributor order: ``m = sum_k wn_k t_k``, ``var = sum_k wn_k ((t_k - m)(t_k - m))``,
    ``out = float32(b + m)``, or ``float32(b + 0.0)`` where frozen (kernels
    ``safe_moments`` / ``safe_freeze``). The variance threshold is an exact order
    statistic (``kth_smallest_nonnegative``: counting passes over the bit patterns;
    variances are never -0.0 or NaN), which holds one float64 variance per element of
    the tensor in memory."""

    name = "safe_merge"
    params_type = SafeMergeParams

    def merge(self, inp: MergeInput, params: SafeMergeParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        w = checked_weights(inp, positive=True)
        wn = np.ascontiguousarray(w / float(w.sum()), dtype=np.float64)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            stream = TensorStream(inp, spec, chunk, base=use_base)
            var = np.empty(spec.numel)
            flat = np.empty(spec.numel, dtype=np.float32)
            for lo, hi, xs, b in stream.chunks():
                stream.check(safe_moments(xs, b, wn, var[lo:hi], flat[lo:hi]))
            frozen = math.ceil(params.fraction * spec.numel)
            if frozen > 0:
                thr = float(kth_smallest_nonnegative(var, spec.numel - frozen))
                for lo, hi, b in stream.base_chunks():
                    safe_freeze(var[lo:hi], thr, b, flat[lo:hi])
            out[spec.name] = stream.finish(flat)
        return out


@dataclass(frozen=True)
class SceParams(Params):
    """select_topk: fraction of entries (highest variance across contributions) that are merged."""

    select_topk: float = 1.0

    def validate(self) -> None:
        self._number("select_topk", 0.0, 1.0, lo_open=True)


class Sce(Strategy):
    """SCE (Wan et al. 2024, FuseChat: "Select, Calculate, Erase"), per tensor: select the
    ``select_topk`` fraction of entries with the highest (unweighted) variance of the task
    values across contributions (ties at the threshold all count); calculate each
    contribution's coefficient as its share of the squared task values on the selected
    entries; erase entries whose sign disagrees with the sign of the coefficient-weighted
    sum; output ``b + sum c_k t_k / sum c_k`` over the agreeing selected entries.

    Exactly, per element in float64 with k = 0..N-1 in order: ``t_k = x_k - b``;
    ``m = (sum t_k) * (1/N)``, ``var = sum (t_k - m)(t_k - m)``; the threshold is the
    order statistic ``var[numel - keep]`` (``keep = ceil(select_topk * numel)``; no
    threshold when keep is numel), found by ``kth_smallest_nonnegative``; ``e_k`` is the
    exact sum of ``t_k * t_k`` (each square rounded to float64) over the selected
    entries of the whole tensor, rounded once (= ``math.fsum``); ``c_k = e_k / fsum(e)``
    (``1/N`` each if that is 0); ``s = sum c_k t_k``; ``num``, ``den`` add ``c_k t_k``,
    ``c_k`` where selected and ``t_k``, ``s`` are both > 0 or both < 0;
    ``out = float32(b + num / den)`` (den 0 counts as 1). The first numpy version rounded
    the energy sums once per chunk; the bytes are the same for any tensor that fitted one
    chunk. Three passes over the contributions (two when every entry is selected); the
    variance threshold holds one float64 per element of the tensor in memory."""

    name = "sce"
    params_type = SceParams
    min_inputs = 2

    def merge(self, inp: MergeInput, params: SceParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        n = len(inp.tensors)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=use_base)
            keep = math.ceil(params.select_topk * spec.numel)
            var: F64 | None = None
            thr = -1.0
            if 0 < keep < spec.numel:
                var = np.empty(spec.numel)
                for lo, hi, xs, b in stream.chunks():
                    stream.check(sce_variance(xs, b, 1.0 / n, var[lo:hi]))
                thr = float(kth_smallest_nonnegative(var, spec.numel - keep))
            acc = np.zeros((n, EXACT_LIMBS), dtype=np.uint64)
            for lo, hi, xs, b in stream.chunks():
                stream.check(sce_energy(xs, b, None if var is None else var[lo:hi], thr, acc))
            energy = exact_round(acc)
            total = math.fsum(energy)
            c = np.array([e / total if total > 0.0 else 1.0 / n for e in energy], dtype=np.float64)
            flat = np.empty(spec.numel, dtype=np.float32)
            for lo, hi, xs, b in stream.chunks():
                stream.check(sce_combine(xs, b, None if var is None else var[lo:hi], thr, c, flat[lo:hi]))
            out[spec.name] = stream.finish(flat)
        return out
