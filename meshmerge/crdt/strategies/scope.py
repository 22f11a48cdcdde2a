"""Weight scope alignment (Xu et al. 2024, "Weight Scope Alignment: A Frustratingly Easy
Method for Model Merging").

Per tensor, each contribution is standardised by its own mean and standard
deviation, mapped to the target scope (weighted mean of the means, weighted
mean of the standard deviations) and averaged:

    out = sum_k w_k ((x_k - mu_k) * sigma / sigma_k + mu),

which is the affine combination ``sum_k c_k x_k + C`` with
``c_k = w_k sigma / sigma_k`` and ``C = mu - sum_k c_k mu_k`` (a constant
tensor, sigma_k = 0, contributes its mean only). The moments come from one
streaming pass that accumulates what the Gram kernel would for ``(x_k, 1)`` (sum and sum of
squares in float64, fixed lane order; contributors in parallel,
:func:`meshmerge.cext.moment_lanes`); the output pass is the weighted-sum
kernel with the ones vector carrying ``C``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import moment_lanes, weighted_sum_f32
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


def _lane_sums(lanes: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(sum of squares, sum): lanes 0..7 added in order."""
    sq = s1 = 0.0
    for lane in range(8):
        sq = sq + float(lanes[0, lane])
        s1 = s1 + float(lanes[1, lane])
    return sq, s1


class WeightScopeAlignment(Strategy):
    name = "weight_scope_alignment"

    def merge(self, inp: MergeInput, params: Params, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp)
        if np.any(w < 0) or float(w.sum()) == 0.0:
            raise StrategyError("weights must be >= 0 with a positive total")
        total = math.fsum(float(x) for x in w)
        wn = [float(x) / total for x in w]
        n = len(wn)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            stream = TensorStream(inp, spec, chunk)
            numel = spec.numel
            if numel == 0:
                out[spec.name] = stream.finish(np.empty(0, dtype=np.float32))
                continue
            # Only sum x_k and sum x_k^2 are needed: the (x_k, 1) entries of the Gram
            # kernel's lanes (the same numbers a full (N+1)x(N+1) Gram would hold), at O(N).
            lanes = np.zeros((n, 2, 8), dtype=np.float64)
            for lo, _hi, xs, _ in stream.chunks():
                stream.check(moment_lanes(xs, lo, lanes))
            gs = [_lane_sums(lanes[k]) for k in range(n)]
            mus = [gs[k][1] / numel for k in range(n)]
            sigmas = [math.sqrt(max(0.0, gs[k][0] / numel - mus[k] * mus[k])) for k in range(n)]
            mu = math.fsum(wk * m for wk, m in zip(wn, mus, strict=True))
            sigma = math.fsum(wk * s for wk, s in zip(wn, sigmas, strict=True))
            coef = [wn[k] * sigma / sigmas[k] if sigmas[k] > 0.0 else 0.0 for k in range(n)]
            const = mu - math.fsum(c * m for c, m in zip(coef, mus, strict=True))
            c = np.array([*coef, const], dtype=np.float64)
            flat = np.empty(numel, dtype=np.float32)
            for lo, hi, xs, _ in stream.chunks():
                stream.check(weighted_sum_f32([*xs, np.ones(hi - lo, np.float32)], c, flat[lo:hi]))
            out[spec.name] = stream.finish(flat)
        return out
