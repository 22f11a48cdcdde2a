"""Fisher-weighted averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging").

``out = sum_k w_k (F_k + eps) x_k / sum_k w_k (F_k + eps)`` per element, where
``F_k`` is contribution k's diagonal Fisher estimate. Contributions carry it
as a companion tensor named ``<name><suffix>`` (default ``<name>.fisher``) of
the same shape and dtype; the merged model carries the weighted mean Fisher
``sum_k w_k F_k / sum_k w_k`` under the same name, so it can be merged again.
Float64 accumulation in canonical order (kernel :func:`meshmerge.cext.fisher_average`:
the operations written above, each exactly rounded, no fused ops), rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from meshmerge.cext import fisher_average
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights, companion_pairs, in_place_chunk
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError


@dataclass(frozen=True)
class FisherParams(Params):
    """suffix: name suffix of the Fisher companion tensors; epsilon: added to every Fisher value."""

    suffix: str = ".fisher"
    epsilon: float = 1e-8

    def validate(self) -> None:
        if not isinstance(self.suffix, str) or not self.suffix:
            raise StrategyError("suffix must be a non-empty string")
        self._number("epsilon", 0.0, 1e30, lo_open=True)


class FisherMerge(Strategy):
    name = "fisher_merge"
    params_type = FisherParams

    def merge(self, inp: MergeInput, params: FisherParams, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp, positive=True)
        eps = params.epsilon
        total = float(np.sum(w))
        out: dict[str, Any] = {}
        for spec, fspec in companion_pairs(inp, params.suffix, self.name, "Fisher", required=True):
            assert fspec is not None
            # One kernel call when both tensors are F32 (see in_place_chunk); a 16-bit
            # tensor of the pair keeps ``chunk``, since its chunks are widened copies.
            step = min(in_place_chunk(spec, chunk), in_place_chunk(fspec, chunk))
            xs_stream = TensorStream(inp, spec, step)
            fs_stream = TensorStream(inp, fspec, step)
            flat = empty_f32(spec.numel)
            fflat = empty_f32(spec.numel)
            for (lo, hi, xs, _), (_, _, fs, _) in zip(xs_stream.chunks(), fs_stream.chunks(), strict=True):
                bad, what = fisher_average(xs, fs, w, eps, total, flat[lo:hi], fflat[lo:hi])
                if bad >= 0 and what == 0:
                    raise StrategyError(f"contribution {bad} Fisher {fspec.name!r} must be finite and >= 0")
                xs_stream.check(bad)
            out[spec.name] = xs_stream.finish(flat)
            out[fspec.name] = fs_stream.finish(fflat)
        return out
