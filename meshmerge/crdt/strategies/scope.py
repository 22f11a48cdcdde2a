"""Weight scope alignment (Xu et al. 2024, "Weight Scope Alignment: A Frustratingly Easy
Method for Model Merging").

Per tensor, each contribution is standardised by its own mean and standard
deviation, mapped to the target scope (weighted mean of the means, weighted
mean of the standard deviations) and averaged:

    out = sum_k w_k ((x_k - mu_k) * sigma / sigma_k + mu),

which is the affine combination ``sum_k c_k x_k + C`` with
``c_k = w_k sigma / sigma_k`` and ``C = mu - sum_k c_k mu_k`` (a constant
tensor, sigma_k = 0, contributes its mean only). The moments come from one
streaming pass of the Gram kernel with a ones vector appended (sum and sum of
squares in float64, fixed lane order); the output pass is the weighted-sum
kernel with the ones vector carrying ``C``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from meshmerge.cext import gram_accumulate, gram_finalize, weighted_sum_f32
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


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
            # Only sum x_k and sum x_k^2 are needed: a 2x2 Gram of (x_k, 1) per contributor
            # (each Gram entry is accumulated on its own, so these are the same numbers a
            # full (N+1)x(N+1) Gram would hold, at O(N) instead of O(N^2) work).
            lanes = [np.zeros((2, 2, 8), dtype=np.float64) for _ in range(n)]
            for lo, hi, xs, _ in stream.chunks():
                ones = np.ones(hi - lo, np.float32)
                for k in range(n):
                    stream.check(k if gram_accumulate([xs[k], ones], None, lo, lanes[k]) >= 0 else -1)
            gs = [gram_finalize(lk) for lk in lanes]
            mus = [float(gs[k][0, 1]) / numel for k in range(n)]
            sigmas = [math.sqrt(max(0.0, float(gs[k][0, 0]) / numel - mus[k] * mus[k])) for k in range(n)]
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
