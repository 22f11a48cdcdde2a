"""Data-free versions of merges that their papers define with data.

A merge here is a pure function of the signed contributions, so a method that
needs activations or unlabeled test data at merge time cannot run as its paper
defines it. These five have data-free proxies that crdt-merge 0.11.0 also
offers under the same names; ours compute the same kind of thing, but respect
contribution weights (crdt-merge ignores them in the first three and in the
mask of the fifth, and takes plain means of the input statistics in the
fourth) and give the same bytes on every replica. Kinds: weights and delta
(LoRA factors cannot be combined this way).

* ``regression_mean`` — RegMean (Jin et al. 2023, "Dataless Knowledge Fusion
  by Merging Weights of Language Models") solves, per linear layer, the least
  squares problem ``min_W sum_k ||X_k W - X_k W_k||^2``, whose solution is
  ``(sum_k G_k)^-1 sum_k G_k W_k`` with ``G_k = X_k^T X_k`` the Gram matrix of
  the layer's input activations on task k's data. Contributions do not carry
  ``G_k``. If they carry its diagonal as a companion tensor ``<name><suffix>``
  (default ``<name>.regmean``) of the same shape, we compute the diagonal
  RegMean ``sum_k w_k (g_k + lam) x_k / sum_k w_k (g_k + lam)`` per element and
  the merged model carries ``sum_k w_k g_k / sum_k w_k`` under the companion
  name; otherwise, as crdt-merge does, each element weighs itself:
  ``g_k = x_k^2`` (parameters of large magnitude dominate). ``lam`` is
  ``regularization`` (> 0, so the denominator is never zero).
* ``ada_merging`` — AdaMerging (Yang et al. 2024) learns task-wise or
  layer-wise coefficients by minimising the prediction entropy of the merged
  model on unlabeled test data. We instead start from a prior that favours
  contributions whose parameter magnitudes are concentrated (lower Shannon
  entropy of ``|x_k|`` normalised to a distribution, as crdt-merge does), times
  the contribution weight, then take ``steps`` fixed steps
  ``c <- c + lr (t - c)`` toward ``t_k ∝ w_k / (e_k + epsilon)``, where
  ``e_k = mean((sum_j c_j x_j - x_k)^2)`` is how badly the current merge
  reconstructs contribution k. ``e_k = (c^T G c - 2 (G c)_k + G_kk) / M`` with
  ``G`` the Gram matrix of the contributions (one streaming pass), so a step
  costs O(N^2), not a pass over the model. This feedback is self-reinforcing:
  contributions near the current merge gain weight and outliers lose it, and
  with many steps or a large ``learning_rate`` the coefficients settle on a
  single contribution near the centre. Each step keeps a share ``1 - lr`` of
  the current coefficients, so with the defaults (crdt-merge's: learning_rate
  0.01, 100 steps for ``ada_merging``, 50 for ``dam``) at least 37% / 61% of
  the result is still the prior.
* ``dam`` — DAM (Gauthier-Caron et al. 2024, "Merging in a Bottle") learns
  per-feature scaling coefficients by gradient descent on the KL divergence
  between the merged model's and each input model's outputs on data. We run the
  same data-free refinement as ``ada_merging`` (weight moves toward the
  contributions the merge reconstructs best, away from outliers), from the
  weights as prior (crdt-merge starts from uniform), per tensor by default:
  per-feature coefficients would need per-feature Gram matrices and the data
  DAM optimises on.
* ``representation_surgery`` — Representation Surgery (Yang et al. 2024)
  trains a small module that removes the bias between the merged model's and
  each task model's representations on task data. crdt-merge instead corrects
  each merged tensor's statistics, which is what we compute, on the values as
  given (weights or deltas; the base is not used): the weighted average
  ``y = sum_k w_k x_k / sum_k w_k`` (rounded to float32), then
  ``out = s (y - mean(y)) + mean(y) + d`` with ``d = sum_k w_k (mu_k - mean(y)) / sum w``
  (``mu_k`` the mean of ``x_k``) and, for ``correction="rescale"``,
  ``s = sqrt(sum_k w_k (var_k / var(y)) / sum w)``, restoring the spread that
  averaging shrinks (``s = 1`` for ``"center"``, or when ``var(y) = 0``).
  Unlike crdt-merge the input statistics are weighted, so ``"center"`` only
  undoes the float32 rounding drift of the mean; crdt-merge's ``"whiten"``
  needs an eigendecomposition and is not offered (no deterministic kernel).
  Statistics are float64 sums in a fixed lane order by element index
  (:func:`meshmerge.cext.moment_lanes`, contributors in parallel); ``y`` and
  the correction are weighted sums (the second of ``(y, 1)``). Peak memory:
  two float32 copies of the largest tensor. (A single fused pass reading each
  contribution once for both was measured slower than these two passes.)
* ``split_unlearn_merge`` — SUM (Kadhe et al. 2024, "Split, Unlearn, Merge")
  splits the forget data by attribute, unlearns each split on a copy of the
  model (gradient steps on data) and merges the results with task arithmetic;
  none of that can run without the data. crdt-merge's proxy, which we compute
  per tensor: the normalised weighted task-vector average
  ``b + sum_k w_k (x_k - b) / sum w``, with a ``fraction`` of the entries reset
  to the base: ``"magnitude"`` resets those whose weighted mean magnitude
  ``sum_k w_k |x_k - b| / sum w`` is at most the ``floor(fraction * M)``-th
  smallest (ties included, exact selection), ``"random"`` resets each entry
  with probability ``fraction`` from the counter-based PRNG keyed by the seed
  (the Merkle root) and the tensor name. Unlike crdt-merge, weights enter the
  magnitude score, and ``fraction = 0`` resets nothing (crdt-merge always
  resets at least one entry). It needs task vectors (delta contributions, or
  weights with the base). Peak memory: a float64 score of the largest tensor
  besides the output.

For ``ada_merging`` and ``dam`` with ``weights`` contributions and a base
model, ``x_k`` above is the task vector ``x_k - b`` and the result is
``b + sum_k c_k (x_k - b)``; without a base the weights themselves are used
(as crdt-merge does); ``delta`` contributions are merged as given. The
coefficients sum to 1.

Determinism: the entropy sums and the Gram matrix come from kernels with a
fixed reduction order (:mod:`meshmerge.cext.datafree`, :mod:`meshmerge.cext.gram`),
span values are added with a correctly rounded sum, and the scalar iteration
uses Python floats (IEEE double, no FMA) with correctly rounded sums and the
IEEE-only ``log`` of :mod:`detmath`. The final pass is the weighted
combination of :func:`combine_tensor` (float64 accumulation, one rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import (
    LOG_SPAN,
    abs_log_spans,
    keep_base_at_most,
    kth_smallest_nonnegative,
    mean_abs,
    moment_lanes,
    regmean_average,
    stream_key,
    uniform_f64,
    weighted_sum_f32,
)
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies import detmath
from meshmerge.crdt.strategies._combine import (
    _task_chunk,
    combine_tensor,
    matvec,
    model_gram,
    quad,
    total_gram,
)
from meshmerge.crdt.strategies._stream import (
    TensorStream,
    checked_weights,
    companion_pairs,
    in_place_chunk,
    task_base,
)
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError
from meshmerge.crdt.tensors import TensorSpec


@dataclass(frozen=True)
class RegMeanParams(Params):
    """regularization: lam added to every Gram diagonal value (or x^2); suffix: companion tensor suffix."""

    regularization: float = 0.01
    suffix: str = ".regmean"

    def validate(self) -> None:
        self._number("regularization", 0.0, 1e30, lo_open=True)
        if not isinstance(self.suffix, str) or not self.suffix:
            raise StrategyError("suffix must be a non-empty string")


class RegressionMean(Strategy):
    """Diagonal RegMean with Gram companions, else the self-weighted average ``g_k = x_k^2``."""

    name = "regression_mean"
    params_type = RegMeanParams

    def merge(self, inp: MergeInput, params: RegMeanParams, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp, positive=True)
        wn = np.ascontiguousarray(w / math.fsum(w.tolist()), dtype=np.float64)
        lam = float(params.regularization)
        out: dict[str, Any] = {}
        for spec, gspec in companion_pairs(inp, params.suffix, self.name, "Gram diagonal", required=False):
            step = in_place_chunk(spec, chunk)
            if gspec is not None:
                step = min(step, in_place_chunk(gspec, chunk))
            xs_stream = TensorStream(inp, spec, step)
            flat = empty_f32(spec.numel)
            if gspec is None:
                for lo, hi, xs, _ in xs_stream.chunks():
                    bad, _what = regmean_average(xs, None, wn, lam, flat[lo:hi], None)
                    xs_stream.check(bad)
                out[spec.name] = xs_stream.finish(flat)
                continue
            gs_stream = TensorStream(inp, gspec, step)
            gflat = empty_f32(spec.numel)
            for (lo, hi, xs, _), (_, _, gs, _) in zip(xs_stream.chunks(), gs_stream.chunks(), strict=True):
                bad, what = regmean_average(xs, gs, wn, lam, flat[lo:hi], gflat[lo:hi])
                if bad >= 0 and what == 0:
                    raise StrategyError(
                        f"contribution {bad} Gram companion {gspec.name!r} must be finite and >= 0"
                    )
                xs_stream.check(bad)
            out[spec.name] = xs_stream.finish(flat)
            out[gspec.name] = gs_stream.finish(gflat)
        return out


GRANULARITIES = ("task", "layer")


@dataclass(frozen=True)
class RefineParams(Params):
    """granularity: one coefficient vector for the whole model ("task") or per tensor ("layer");
    steps: refinement steps; learning_rate: step size toward the target; epsilon: added to each
    reconstruction error before inverting it."""

    granularity: str = "layer"
    steps: int = 50
    learning_rate: float = 0.01
    epsilon: float = 1e-12

    def validate(self) -> None:
        self._choice("granularity", GRANULARITIES)
        self._integer("steps", 0, 100_000)
        self._number("learning_rate", 0.0, 1.0, lo_open=True)
        self._number("epsilon", 0.0, 1e30, lo_open=True)


@dataclass(frozen=True)
class AdaParams(RefineParams):
    """As RefineParams; entropy_offset: added to ``max_j H_j - H_k`` so no prior is zero."""

    granularity: str = "task"
    steps: int = 100
    entropy_offset: float = 1e-6

    def validate(self) -> None:
        super().validate()
        self._number("entropy_offset", 0.0, 1e30, lo_open=True)


def refine(
    g: list[list[float]], m: int, w: list[float], c0: list[float], params: RefineParams
) -> list[float]:
    """``steps`` steps of ``c <- c + lr (t - c)``, ``t_k ∝ w_k / (e_k + eps)`` (see the module docstring).

    ``w`` and ``c0`` are normalised; so is the result. Stops early once every
    ``e_k`` is 0 (the merge reproduces every contribution: nothing to move toward).
    """
    n = len(w)
    c = list(c0)
    if m == 0:
        return c
    lr = float(params.learning_rate)
    eps = float(params.epsilon)
    for _ in range(params.steps):
        gc = matvec(g, c)
        cgc = quad(g, c, c)
        e = [max(0.0, math.fsum([cgc, -2.0 * gc[k], g[k][k]]) / m) for k in range(n)]
        if max(e) == 0.0:
            break
        inv = [w[k] / (e[k] + eps) for k in range(n)]
        s = math.fsum(inv)
        stepped = [max(0.0, c[k] + lr * (inv[k] / s - c[k])) for k in range(n)]
        total = math.fsum(stepped)
        c = [v / total for v in stepped]
    return c


def _normalised(v: list[float]) -> list[float]:
    s = math.fsum(v)
    return [x / s for x in v]


def _abs_log_sums(
    inp: MergeInput, spec: TensorSpec, chunk: int, use_base: bool
) -> npt.NDArray[np.float64]:
    """Span values ``(sum |v|, sum |v| log |v|)`` of every contribution, shape (N, spans, 2)."""
    n = len(inp.tensors)
    step = max(LOG_SPAN, chunk // LOG_SPAN * LOG_SPAN)
    stream = TensorStream(inp, spec, step, base=use_base)
    parts = []
    for lo, hi, xs, b in stream.chunks():
        spans = np.zeros((n, (hi - lo + LOG_SPAN - 1) // LOG_SPAN, 2), dtype=np.float64)
        stream.check(abs_log_spans(xs, b, spans))
        parts.append(spans)
    if not parts:
        return np.zeros((n, 0, 2), dtype=np.float64)
    return np.concatenate(parts, axis=1)


def entropy(s: float, t: float, m: int) -> float:
    """Shannon entropy (nats) of ``p_i = a_i / s`` given ``s = sum a_i``, ``t = sum a_i log a_i``.

    ``-sum p_i log p_i = log s - t / s``; an all-zero vector counts as uniform (``log m``).
    """
    if s <= 0.0:
        return detmath.log(float(m))
    return detmath.log(s) - t / s


def entropy_prior(h: list[float], w: list[float], offset: float) -> list[float]:
    """``c_k ∝ w_k (max_j H_j - H_k + offset)``: lower entropy, more concentrated, more weight."""
    top = max(h)
    return _normalised([w[k] * ((top - h[k]) + offset) for k in range(len(h))])


class _Refined(Strategy):
    """Coefficients from a prior refined on the Gram matrix, then one weighted combination."""

    params_type = RefineParams

    def prior(
        self, inp: MergeInput, params: Any, specs: list[TensorSpec], sums: dict[str, Any], w: list[float]
    ) -> list[float]:
        return list(w)

    def needs_sums(self) -> bool:
        return False

    def coefficients(self, inp: MergeInput, params: Any, chunk: int) -> list[list[float]]:
        """One coefficient list per tensor (spec order), each summing to 1."""
        n = len(inp.tensors)
        w = _normalised(checked_weights(inp, positive=True).tolist())
        use_base = _uses_base(inp)
        grams = model_gram(inp, chunk, base=use_base)
        sums = {s.name: _abs_log_sums(inp, s, chunk, use_base) for s in inp.specs} if self.needs_sums() else {}
        specs = list(inp.specs)
        if params.granularity == "task":
            c0 = self.prior(inp, params, specs, sums, w)
            c = refine(total_gram(grams, n), sum(s.numel for s in specs), w, c0, params)
            return [c] * len(specs)
        coefs = []
        for spec, g in zip(specs, grams, strict=True):
            c0 = self.prior(inp, params, [spec], sums, w)
            coefs.append(refine(g.tolist(), spec.numel, w, c0, params))
        return coefs

    def merge(self, inp: MergeInput, params: Any, chunk: int) -> dict[str, Any]:
        coefs = self.coefficients(inp, params, chunk)
        use_base = _uses_base(inp)
        return {
            spec.name: combine_tensor(inp, spec, np.asarray(c, dtype=np.float64), chunk, base=use_base)
            for spec, c in zip(inp.specs, coefs, strict=True)
        }


def _uses_base(inp: MergeInput) -> bool:
    return inp.kind == "weights" and inp.base is not None


class AdaMerging(_Refined):
    """Entropy prior on ``|x_k|`` times the weights, refined toward the best-reconstructed contributions."""

    name = "ada_merging"
    params_type = AdaParams

    def needs_sums(self) -> bool:
        return True

    def prior(
        self, inp: MergeInput, params: Any, specs: list[TensorSpec], sums: dict[str, Any], w: list[float]
    ) -> list[float]:
        m = sum(s.numel for s in specs)
        if m == 0:
            return list(w)
        h = []
        for k in range(len(w)):
            s = math.fsum([v for spec in specs for v in sums[spec.name][k, :, 0].tolist()])
            t = math.fsum([v for spec in specs for v in sums[spec.name][k, :, 1].tolist()])
            h.append(entropy(s, t, m))
        return entropy_prior(h, w, float(params.entropy_offset))


class Dam(_Refined):
    """The weights as prior, refined toward the best-reconstructed contributions (per tensor by default)."""

    name = "dam"


CORRECTIONS = ("rescale", "center")


@dataclass(frozen=True)
class SurgeryParams(Params):
    """correction: "rescale" (restore the input spread and mean) or "center" (restore the mean only)."""

    correction: str = "rescale"

    def validate(self) -> None:
        self._choice("correction", CORRECTIONS)


def _moments(lanes: npt.NDArray[np.float64], m: int) -> tuple[float, float]:
    """(mean, variance) from moment_lanes' lanes (lanes 0..7 added in order)."""
    sq = s1 = 0.0
    for lane in range(8):
        sq = sq + float(lanes[0, lane])
        s1 = s1 + float(lanes[1, lane])
    mu = s1 / m
    return mu, max(0.0, sq / m - mu * mu)


class RepresentationSurgery(Strategy):
    """Weighted average, then an affine correction of each tensor toward the inputs' statistics."""

    name = "representation_surgery"
    params_type = SurgeryParams

    def merge(self, inp: MergeInput, params: SurgeryParams, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp, positive=True).tolist()
        total = math.fsum(w)
        wn = np.asarray([x / total for x in w], dtype=np.float64)
        n = len(w)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            m = spec.numel
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk))
            merged = empty_f32(m)
            lanes = np.zeros((n, 2, 8), dtype=np.float64)
            for lo, hi, xs, _ in stream.chunks():
                stream.check(moment_lanes(xs, lo, lanes))
                stream.check(weighted_sum_f32(xs, wn, merged[lo:hi]))
            if m == 0:
                out[spec.name] = stream.finish(merged)
                continue
            mlanes = np.zeros((1, 2, 8), dtype=np.float64)
            moment_lanes([merged], 0, mlanes)
            mu_m, var_m = _moments(mlanes[0], m)
            stats = [_moments(lanes[k], m) for k in range(n)]
            # Differences from the merged statistics, so identical inputs give exactly 0 and 1.
            shift = math.fsum([w[k] * (stats[k][0] - mu_m) for k in range(n)]) / total
            scale = 1.0
            if params.correction == "rescale" and var_m > 0.0:
                scale = math.sqrt(math.fsum([w[k] * (stats[k][1] / var_m) for k in range(n)]) / total)
            coef = np.array([scale, (mu_m + shift) - scale * mu_m], dtype=np.float64)
            res = empty_f32(m)
            ones = np.ones(min(m, chunk), dtype=np.float32)
            for lo in range(0, m, chunk):
                hi = min(lo + chunk, m)
                weighted_sum_f32([merged[lo:hi], ones[: hi - lo]], coef, res[lo:hi])
            out[spec.name] = stream.finish(res)
        return out


METHODS = ("magnitude", "random")
#: PRNG stream of split_unlearn_merge's random mask (distinct from the per-contribution streams).
SUM_STREAM = 0x53554D00


@dataclass(frozen=True)
class SplitUnlearnParams(Params):
    """fraction: share of each tensor's entries reset to the base; method: which entries."""

    fraction: float = 0.1
    method: str = "magnitude"

    def validate(self) -> None:
        self._number("fraction", 0.0, 1.0)
        self._choice("method", METHODS)


class SplitUnlearnMerge(Strategy):
    """Weighted task-vector average with a fraction of each tensor's entries reset to the base."""

    name = "split_unlearn_merge"
    params_type = SplitUnlearnParams

    def merge(self, inp: MergeInput, params: SplitUnlearnParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        w = checked_weights(inp, positive=True).tolist()
        total = math.fsum(w)
        wn = np.asarray([x / total for x in w], dtype=np.float64)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            m = spec.numel
            stream = TensorStream(inp, spec, in_place_chunk(spec, chunk), base=use_base)
            flat = empty_f32(m)
            k = int(m * params.fraction) if params.method == "magnitude" else 0
            score = np.empty(m, dtype=np.float64)
            for lo, hi, xs, b in stream.chunks():
                if params.method == "magnitude":
                    stream.check(mean_abs(xs, b, wn, score[lo:hi]))
                stream.check(_task_chunk(xs, b, wn, flat[lo:hi]))
            if params.method == "random":
                uniform_f64(stream_key(inp.seed, spec.name, SUM_STREAM), 0, score)
                threshold = math.nextafter(float(params.fraction), 0.0) if params.fraction > 0.0 else -1.0
            else:
                threshold = kth_smallest_nonnegative(score, k - 1) if k > 0 else -1.0
            if threshold >= 0.0:
                for lo, hi, b in stream.base_chunks():
                    keep_base_at_most(score[lo:hi], threshold, b, flat[lo:hi])
            out[spec.name] = stream.finish(flat)
        return out
