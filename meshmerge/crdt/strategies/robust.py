"""Byzantine-robust aggregators.

Contributor weights are self-declared, so a Byzantine contributor could
inflate its own: every strategy here gives each contribution one vote and
ignores ``MergeInput.weights``.

* ``median`` — coordinate-wise median (Yin et al. 2018, "Byzantine-robust
  distributed learning: towards optimal statistical rates").
* ``trimmed_mean`` — coordinate-wise trimmed mean (same paper): drop the
  ``floor(trim * N)`` smallest and largest values per element, mean of the rest.
* ``krum`` / ``multi_krum`` — Blanchard et al. 2017; El Mhamdi et al. 2018:
  score each contribution by the sum of its ``N - f - 2`` smallest squared
  distances to the others (whole model), average the ``m`` best (Krum: m=1).
* ``geometric_median`` — RFA (Pillutla, Kakade, Harchaoui 2022): a fixed
  number of smoothed Weiszfeld iterations.
* ``centered_clipping`` — Karimireddy, He, Jaggi 2021: starting from the base
  (zero update), ``v += mean_k clip(x_k - v, tau)`` for a fixed number of
  iterations.
* ``foolsgold`` — Fung, Yoon, Beschastnikh 2020 (FoolsGold) / SybilWall-style
  similarity down-weighting: contributions whose updates point in the same
  direction as another contribution's lose weight (cosine similarity with
  pardoning and a logit squash); the result is the alpha-weighted mean update.

The whole-model strategies (Krum, geometric median, centered clipping,
FoolsGold) work in the span of the contributions: one streaming pass builds
the N x N Gram matrix (:mod:`meshmerge.cext.gram`), the small iteration runs
on coefficient vectors with correctly rounded sums (``math.fsum``) and
:mod:`detmath` scalars, and one more pass writes ``b + sum_k c_k (x_k - b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshmerge.cext import sorted_reduce
from meshmerge.crdt.strategies import detmath
from meshmerge.crdt.strategies._combine import combine_tensor, matvec, model_gram, quad, total_gram
from meshmerge.crdt.strategies._stream import TensorStream
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


def _sorted(inp: MergeInput, mode: int, trim: int, chunk: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in inp.specs:
        stream = TensorStream(inp, spec, chunk)
        flat = np.empty(spec.numel, dtype=np.float32)
        for lo, hi, xs, _ in stream.chunks():
            stream.check(sorted_reduce(xs, mode, trim, flat[lo:hi]))
        out[spec.name] = stream.finish(flat)
    return out


class Median(Strategy):
    """Coordinate-wise median: middle value, or float64 mean of the two middle values."""

    name = "median"

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        return _sorted(inp, 0, 0, chunk)


@dataclass(frozen=True)
class TrimmedMeanParams(Params):
    """trim: fraction of contributions dropped at each end per element (floor(trim*N) each side)."""

    trim: float = 0.1

    def validate(self) -> None:
        self._number("trim", 0.0, 0.5, hi_open=True)


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    params_type = TrimmedMeanParams

    def merge(self, inp: MergeInput, params: TrimmedMeanParams, chunk: int) -> dict[str, Any]:
        n = len(inp.tensors)
        trim = math.floor(params.trim * n)
        if 2 * trim >= n:
            raise StrategyError(f"trim={params.trim} drops all {n} contributions")
        return _sorted(inp, 1, trim, chunk)


def _span(inp: MergeInput, chunk: int) -> tuple[bool, list[list[float]]]:
    """Whole-model Gram matrix of the updates (x_k - b when a base is given)."""
    use_base = inp.kind == "weights" and inp.base is not None
    return use_base, total_gram(model_gram(inp, chunk, base=use_base), len(inp.tensors))


def _write(inp: MergeInput, coef: list[float], use_base: bool, chunk: int) -> dict[str, Any]:
    c = np.array(coef, dtype=np.float64)
    return {spec.name: combine_tensor(inp, spec, c, chunk, base=use_base) for spec in inp.specs}


def _sqdist(g: list[list[float]], i: int, j: int) -> float:
    return max(0.0, (g[i][i] + g[j][j]) - 2.0 * g[i][j])


@dataclass(frozen=True)
class KrumParams(Params):
    """f: number of Byzantine contributions tolerated (None: the largest f with N > 2f + 2);
    m: how many best-scored contributions are averaged (None: 1 for krum, N - f for multi_krum)."""

    f: int | None = None
    m: int | None = None

    def validate(self) -> None:
        if self.f is not None:
            self._integer("f", 0, 1 << 30)
        if self.m is not None:
            self._integer("m", 1, 1 << 30)


class Krum(Strategy):
    name = "krum"
    params_type = KrumParams
    min_inputs = 3
    default_m_all = False

    def merge(self, inp: MergeInput, params: KrumParams, chunk: int) -> dict[str, Any]:
        n = len(inp.tensors)
        f = (n - 3) // 2 if params.f is None else params.f
        if n <= 2 * f + 2:
            raise StrategyError(f"krum needs N > 2f + 2; got N={n}, f={f}")
        m = params.m if params.m is not None else (n - f if self.default_m_all else 1)
        if m > n:
            raise StrategyError(f"m={m} exceeds the {n} contributions")
        use_base, g = _span(inp, chunk)
        closest = n - f - 2
        scores = []
        for i in range(n):
            d = sorted(_sqdist(g, i, j) for j in range(n) if j != i)
            scores.append((math.fsum(d[:closest]), i))
        chosen = sorted(i for _, i in sorted(scores)[:m])
        coef = [1.0 / m if i in chosen else 0.0 for i in range(n)]
        return _write(inp, coef, use_base, chunk)


class MultiKrum(Krum):
    name = "multi_krum"
    default_m_all = True


@dataclass(frozen=True)
class GeometricMedianParams(Params):
    """iterations: Weiszfeld steps (fixed count); nu: smoothing, distances below it count as nu."""

    iterations: int = 8
    nu: float = 1e-6

    def validate(self) -> None:
        self._integer("iterations", 1, 1000)
        self._number("nu", 0.0, 1e30, lo_open=True)


class GeometricMedian(Strategy):
    name = "geometric_median"
    params_type = GeometricMedianParams

    def merge(self, inp: MergeInput, params: GeometricMedianParams, chunk: int) -> dict[str, Any]:
        n = len(inp.tensors)
        use_base, g = _span(inp, chunk)
        a = [1.0 / n] * n
        for _ in range(params.iterations):
            ga = matvec(g, a)
            aga = quad(g, a, a)
            beta = []
            for k in range(n):
                d2 = max(0.0, math.fsum([g[k][k], -2.0 * ga[k], aga]))
                beta.append(1.0 / max(math.sqrt(d2), params.nu))
            total = math.fsum(beta)
            a = [b / total for b in beta]
        return _write(inp, a, use_base, chunk)


@dataclass(frozen=True)
class CenteredClippingParams(Params):
    """tau: clipping radius (None: the median distance to the current centre, per iteration);
    iterations: fixed number of clipping steps."""

    tau: float | None = None
    iterations: int = 3

    def validate(self) -> None:
        if self.tau is not None:
            self._number("tau", 0.0, 1e30, lo_open=True)
        self._integer("iterations", 1, 1000)


class CenteredClipping(Strategy):
    name = "centered_clipping"
    params_type = CenteredClippingParams

    def merge(self, inp: MergeInput, params: CenteredClippingParams, chunk: int) -> dict[str, Any]:
        n = len(inp.tensors)
        use_base, g = _span(inp, chunk)
        # Centre starts at the base (zero update); without a base at the plain mean.
        a = [0.0] * n if (use_base or inp.kind == "delta") else [1.0 / n] * n
        for _ in range(params.iterations):
            ga = matvec(g, a)
            aga = quad(g, a, a)
            dist = [math.sqrt(max(0.0, math.fsum([g[k][k], -2.0 * ga[k], aga]))) for k in range(n)]
            tau = params.tau if params.tau is not None else sorted(dist)[(n - 1) // 2]
            scale = [min(1.0, tau / d) if d > 0.0 else 0.0 for d in dist]
            # v += (1/n) sum_k s_k (x_k - v)
            shrink = math.fsum(scale) / n
            a = [a[k] * (1.0 - shrink) + scale[k] / n for k in range(n)]
        return _write(inp, a, use_base, chunk)


@dataclass(frozen=True)
class FoolsGoldParams(Params):
    """confidence: kappa of the logit squash alpha = kappa * (ln(a / (1 - a)) + 0.5)."""

    confidence: float = 1.0

    def validate(self) -> None:
        self._number("confidence", 0.0, 1e6, lo_open=True)


def foolsgold_alphas(g: list[list[float]], confidence: float) -> list[float]:
    """FoolsGold learning rates from a Gram matrix of updates (pure, deterministic)."""
    n = len(g)
    norms = [math.sqrt(max(0.0, g[k][k])) for k in range(n)]
    cs = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j and norms[i] > 0.0 and norms[j] > 0.0:
                cs[i][j] = g[i][j] / (norms[i] * norms[j])
    # As in FoolsGold, a contribution's similarity to itself counts as 0, so v_i >= 0.
    v = [max(cs[i]) for i in range(n)]
    for i in range(n):
        for j in range(n):
            if i != j and v[j] > v[i] and v[j] > 0.0:
                cs[i][j] *= v[i] / v[j]
    alpha = [min(1.0, max(0.0, 1.0 - max(cs[i]))) for i in range(n)]
    top = max(alpha)
    if top == 0.0:
        return [0.0] * n
    alpha = [a / top for a in alpha]
    out = []
    for a in alpha:
        if a <= 0.0:
            out.append(0.0)
            continue
        a = min(a, 0.99)
        out.append(min(1.0, max(0.0, confidence * (detmath.log(a / (1.0 - a)) + 0.5))))
    return out


class FoolsGold(Strategy):
    """Similarity-weighted mean update; if every contribution is a clone of another, the base
    (zero update) comes back: FoolsGold gives clones no weight."""

    name = "foolsgold"
    params_type = FoolsGoldParams
    min_inputs = 2

    def merge(self, inp: MergeInput, params: FoolsGoldParams, chunk: int) -> dict[str, Any]:
        if inp.kind == "weights" and inp.base is None:
            raise StrategyError("foolsgold compares updates: give delta contributions or the base model")
        n = len(inp.tensors)
        use_base, g = _span(inp, chunk)
        alpha = foolsgold_alphas(g, params.confidence)
        total = math.fsum(alpha)
        coef = [a / total for a in alpha] if total > 0.0 else [0.0] * n
        return _write(inp, coef, use_base, chunk)
