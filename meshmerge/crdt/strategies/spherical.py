"""Spherical interpolation and means: SLERP, Karcher / multi-SLERP, model stock.

Angles are computed once per tensor from that tensor's Gram matrix (one
streaming pass, :mod:`meshmerge.cext.gram`) with :mod:`detmath` (IEEE
``+ - * / sqrt`` only, so every replica gets the same coefficients), then a
second pass writes ``sum_k c_k x_k`` in float64.

* ``slerp`` — Shoemake 1985, as used for LLM merging (mergekit): with two
  contributions, ``t`` (default ``w_1 / (w_0 + w_1)``), angle
  ``theta = acos(<x0, x1> / (|x0| |x1|))`` over the flattened tensor,
  ``out = sin((1-t) theta)/sin(theta) x0 + sin(t theta)/sin(theta) x1``;
  nearly parallel tensors (|cos| > 1 - 1e-7) or a zero tensor fall back to
  linear interpolation. With more than two contributions ``slerp`` is the
  weighted Karcher mean below (for two inputs of equal norm that mean is this
  slerp; for unequal norms slerp's result norm differs, as in mergekit).
* ``karcher`` — weighted Riemannian (Karcher) mean of the directions
  ``x_k/|x_k|`` on the unit sphere by Riemannian gradient steps
  ``m <- exp_m(sum_k w_k log_m(u_k))`` starting at the normalised weighted
  Euclidean mean, rescaled to the weighted mean norm ``sum_k w_k |x_k|``;
  at most ``steps`` steps, and it stops as soon as a step would move the
  iterate by at most ``KARCHER_TOL`` = 1e-12 radians (converged far below the
  float32 output's resolution; a pure function of the Gram matrix, so every
  replica stops at the same step).
  ``multislerp`` is the same with one step (tangent-space barycentre).
  All iterates stay in the span of the x_k, so they run on N coefficients.
* ``model_stock`` — Jang, Yun, Han 2024, "Model Stock": per tensor,
  ``cos`` = mean pairwise cosine of the task vectors,
  ``t = N cos / (1 + (N - 1) cos)``, ``out = b + t * mean_k (x_k - b)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from meshmerge.crdt.strategies import detmath
from meshmerge.crdt.strategies._combine import combine_tensor, model_gram
from meshmerge.crdt.strategies._stream import task_base, unit_sum_weights
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError

PARALLEL = 1.0 - 1e-7
#: A Karcher step shorter than this (radians) ends the iteration without being taken.
KARCHER_TOL = 1e-12


def slerp_coefficients(g: npt.NDArray[np.float64], t: float) -> list[float]:
    """Coefficients (c0, c1) of the spherical interpolation of two vectors with Gram matrix g."""
    n0 = math.sqrt(float(g[0, 0]))
    n1 = math.sqrt(float(g[1, 1]))
    if n0 == 0.0 or n1 == 0.0:
        return [1.0 - t, t]
    c = float(g[0, 1]) / (n0 * n1)
    if abs(c) > PARALLEL:
        return [1.0 - t, t]
    theta = detmath.acos(c)
    s = detmath.sin(theta)
    return [detmath.sin((1.0 - t) * theta) / s, detmath.sin(t * theta) / s]


def karcher_coefficients(g: npt.NDArray[np.float64], w: list[float], steps: int) -> list[float]:
    """Coefficients a with ``sum_k a_k x_k`` = weighted Karcher mean direction times mean norm."""
    n = len(w)
    gg = [[float(g[i, j]) for j in range(n)] for i in range(n)]
    norms = [math.sqrt(max(0.0, gg[k][k])) for k in range(n)]
    live = [k for k in range(n) if norms[k] > 0.0 and w[k] > 0.0]
    radius = math.fsum(w[k] * norms[k] for k in range(n))
    if not live:
        return [0.0] * n

    def norm_of(a: list[float]) -> float:
        return math.sqrt(max(0.0, math.fsum(a[i] * gg[i][j] * a[j] for i in live for j in live)))

    # Start: normalised weighted mean of the unit directions.
    a = [w[k] / norms[k] if k in live else 0.0 for k in range(n)]
    size = norm_of(a)
    if size == 0.0:
        raise StrategyError("weighted directions cancel out: the spherical mean is undefined")
    a = [x / size for x in a]
    for _ in range(steps):
        ga = [math.fsum(gg[k][j] * a[j] for j in live) for k in range(n)]
        v = [0.0] * n
        pull = []
        for k in live:
            c = max(-1.0, min(1.0, ga[k] / norms[k]))
            theta = detmath.acos(c)
            f = 1.0 if theta == 0.0 else theta / detmath.sin(theta)
            v[k] += w[k] * f / norms[k]
            pull.append(w[k] * f * c)
        back = math.fsum(pull)
        v = [v[k] - back * a[k] for k in range(n)]
        vn = norm_of(v)
        if vn <= KARCHER_TOL:
            break
        cs, sn = detmath.cos(vn), detmath.sin(vn)
        a = [cs * a[k] + sn * v[k] / vn for k in range(n)]
        size = norm_of(a)
        a = [x / size for x in a]
    return [radius * x for x in a]


@dataclass(frozen=True)
class SlerpParams(Params):
    """t: interpolation position for two contributions (None: w1 / (w0 + w1));
    steps: most Karcher iterations when there are more than two contributions."""

    t: float | None = None
    steps: int = 10

    def validate(self) -> None:
        if self.t is not None:
            self._number("t", 0.0, 1.0)
        self._integer("steps", 1, 1000)


class Slerp(Strategy):
    name = "slerp"
    params_type = SlerpParams

    def merge(self, inp: MergeInput, params: SlerpParams, chunk: int) -> dict[str, Any]:
        w = unit_sum_weights(inp, "spherical means")
        n = len(inp.tensors)
        if params.t is not None and n != 2:
            raise StrategyError(f"slerp parameter t needs exactly 2 contributions, got {n}")
        grams = model_gram(inp, chunk, base=False)
        out: dict[str, Any] = {}
        for spec, g in zip(inp.specs, grams, strict=True):
            if n == 1:
                coef = [1.0]
            elif n == 2:
                coef = slerp_coefficients(g, w[1] if params.t is None else params.t)
            else:
                coef = karcher_coefficients(g, w, params.steps)
            out[spec.name] = combine_tensor(inp, spec, np.array(coef), chunk, base=False)
        return out


@dataclass(frozen=True)
class KarcherParams(Params):
    """steps: most Riemannian gradient steps (fewer once a step is below KARCHER_TOL)."""

    steps: int = 10

    def validate(self) -> None:
        self._integer("steps", 1, 1000)


class Karcher(Strategy):
    name = "karcher"
    params_type: ClassVar[type[Params]] = KarcherParams
    default_steps: int | None = None

    def merge(self, inp: MergeInput, params: KarcherParams, chunk: int) -> dict[str, Any]:
        w = unit_sum_weights(inp, "spherical means")
        steps = params.steps if self.default_steps is None else self.default_steps
        grams = model_gram(inp, chunk, base=False)
        return {
            spec.name: combine_tensor(
                inp, spec, np.array(karcher_coefficients(g, w, steps)), chunk, base=False
            )
            for spec, g in zip(inp.specs, grams, strict=True)
        }


@dataclass(frozen=True)
class NoParams(Params):
    pass


class MultiSlerp(Karcher):
    name = "multislerp"
    params_type = NoParams
    default_steps = 1

    def merge(self, inp: MergeInput, params: Any, chunk: int) -> dict[str, Any]:
        return super().merge(inp, KarcherParams(steps=1), chunk)


class ModelStock(Strategy):
    name = "model_stock"
    min_inputs = 2

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        n = len(inp.tensors)
        grams = model_gram(inp, chunk, base=use_base)
        out: dict[str, Any] = {}
        for spec, g in zip(inp.specs, grams, strict=True):
            norms = [math.sqrt(max(0.0, float(g[k, k]))) for k in range(n)]
            cosines = [
                float(g[i, j]) / (norms[i] * norms[j]) if norms[i] > 0.0 and norms[j] > 0.0 else 0.0
                for i in range(n) for j in range(i + 1, n)
            ]
            cos = math.fsum(cosines) / len(cosines)
            den = 1.0 + (n - 1) * cos
            t = n * cos / den if den != 0.0 else 0.0
            coef = np.full(n, t / n)
            out[spec.name] = combine_tensor(inp, spec, coef, chunk, base=use_base)
        return out
