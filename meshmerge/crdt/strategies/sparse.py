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

Magnitude thresholds are exact order statistics of the float32 magnitudes,
found by counting passes (no sort; see :func:`magnitude_thresholds`).
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import drop_threshold, mag_range, mag_select, sparse_merge, stream_key
from meshmerge.cext.outbuf import empty_f32
from meshmerge.crdt.strategies._stream import TensorStream, checked_weights, in_place_chunk, task_base
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError
from meshmerge.crdt.tensors import to_f32

SIGN_MODES = ("total", "count")


#: Histogram bins per (contributor, rank) in one counting pass.
BINS = 1 << 11
#: Largest magnitude bit pattern a finite float32 can have (Inf is reported as an error).
U_MAX = 0x7F7FFFFF
#: Sampled magnitudes per contributor used to guess a narrow first range (for large tensors
#: up to SAMPLE_MAX: one per 512 elements). The sample only sets the width of the guessed
#: range, and so how many in-range values the first pass copies; a small sample in
#: cache-friendly blocks is enough.
SAMPLE = 1 << 14
SAMPLE_MAX = 1 << 16
#: Contiguous elements per sampled block.
SAMPLE_BLOCK = 64
#: Tensors at least this large start from a sampled range (smaller ones: the sample costs
#: more than the counting pass it saves).
SAMPLED_FROM = 16 * SAMPLE
#: Half-width of the guessed range in standard deviations of the sampled quantile.
BRACKET_SIGMAS = 5.0
#: Copies of in-range values the first pass may keep, per (contributor, rank):
#: CAND_SLACK times the count the sample predicts, plus CAND_EXTRA...
CAND_SLACK = 2.0
CAND_EXTRA = 4096
#: ...and at most this many bytes of capacity for one tensor over all contributors and
#: ranks (ranks, then contributors, are taken in order while they fit; the others
#: histogram, which costs them one more pass). Only the copies actually made are
#: resident memory (see _lazy_u32): 4 bytes per value inside a guessed range, about
#: 1.6-3.3% of the elements per contributor and rank at density 0.2 (sample of 2^16 /
#: 2^14); e.g. 26 MB for TIES at N = 16, M = 25M.
CAND_BYTES = 64 << 20
#: Elements per counting-pass call for float32 tensors read in place (the kernel's
#: per-thread counts are 32-bit).
MAX_CALL = 1 << 30


def _shift_for(lo: int, hi: int) -> int:
    s = 0
    while (hi - lo) >> s >= BINS:
        s += 1
    return s


def sample_size(numel: int) -> int:
    """Sampled magnitudes per contributor for a tensor of ``numel`` elements."""
    return min(SAMPLE_MAX, max(SAMPLE, (numel // 512) // SAMPLE_BLOCK * SAMPLE_BLOCK))


def _sample_bits(stream: TensorStream, size: int) -> npt.NDArray[np.uint32]:
    """Magnitude bit patterns of a fixed, evenly spread sample of every contributor's task
    vector, shape (N, size): the same size // SAMPLE_BLOCK blocks for all."""
    numel = stream.numel
    nb = size // SAMPLE_BLOCK
    starts = (np.arange(nb, dtype=np.int64) * numel) // nb
    idx = (starts[:, None] + np.arange(SAMPLE_BLOCK, dtype=np.int64)[None, :]).reshape(-1)
    idx = np.minimum(idx, numel - 1)
    dtype = stream.spec.dtype
    x = np.stack([to_f32(np.asarray(f[idx]), dtype) for f in stream.flats])
    if stream.base is not None:
        x -= to_f32(np.asarray(stream.base[idx]), dtype)
    return np.abs(x, out=x).view(np.uint32)


def _lazy_u32(count: int) -> npt.NDArray[np.uint32]:
    """An uninitialised uint32 array whose pages become resident only when written.

    A plain anonymous mapping: numpy asks for transparent huge pages on large arrays,
    which would make a sparsely filled copy buffer resident in 2 MiB steps."""
    buf = mmap.mmap(-1, max(count, 1) * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=np.uint32, count=count)


def magnitude_thresholds(
    stream: TensorStream, ranks: list[int], *, cand_bytes: int = CAND_BYTES, cand_cap: int | None = None,
) -> npt.NDArray[np.float32]:
    """For each contributor, the float32 value of ``|t_k|`` at each rank (1 = largest).

    Rank 0 gives +inf (nothing is that large). Shape (N, len(ranks)).

    Exact selection by counting passes over the data (``mag_range``): each pass
    counts the magnitudes above a range known to hold the wanted order statistic
    and histograms the range into ``BINS`` bins; the bin that holds the rank
    becomes the next range, until a bin is one bit pattern wide.

    For large tensors the first range is guessed from a fixed sample (a bracket
    around the sampled quantile), and the first pass copies the values inside the
    bracket instead of histogramming them (capacity per contributor and rank:
    ``CAND_SLACK`` x the count the sample predicts + ``CAND_EXTRA``; targets whose
    copies would not fit ``cand_bytes`` for the tensor histogram instead). When
    the counts show the rank inside the bracket and the copies are complete, the
    threshold is selected from the copies (``mag_select``): ONE pass over the data.
    A wrong guess or an overflowing copy only costs further counting passes (for
    the contributors concerned), never exactness: the counts say where the value
    is. ``cand_cap`` (tests) overrides the capacity per contributor and rank.
    """
    n = len(stream.flats)
    numel = stream.numel
    nr = len(ranks)
    res = np.full((n, nr), np.inf, dtype=np.float32)
    if numel == 0 or not any(r > 0 for r in ranks):
        return res
    lo = np.zeros((n, nr), dtype=np.uint32)
    hi = np.full((n, nr), U_MAX, dtype=np.uint32)
    active = np.array([[r > 0 for r in ranks]] * n, dtype=np.uint8)
    caps = np.zeros((n, nr), dtype=np.uint64)
    if numel >= SAMPLED_FROM:
        size = sample_size(numel)
        sample = _sample_bits(stream, size)
        budget = cand_bytes
        brackets: list[tuple[int, int, int]] = []  # (rank index, top, bottom) in sample ranks
        for j, r in enumerate(ranks):
            if r <= 0:
                continue
            q = r / numel
            pos = q * size
            delta = BRACKET_SIGMAS * math.sqrt(size * q * (1.0 - q)) + 16.0
            top = max(0, math.floor(pos - delta))  # rank from the largest
            bottom = min(size - 1, math.ceil(pos + delta))
            brackets.append((j, top, bottom))
        # One partition places every bracket end (each kth is exact on its own).
        part = np.partition(sample, sorted({size - 1 - e for _, t, b in brackets for e in (t, b)}), axis=1)
        for j, top, bottom in brackets:
            hi[:, j] = part[:, size - 1 - top] if top > 0 else U_MAX
            lo[:, j] = part[:, size - 1 - bottom] if bottom < size - 1 else 0
            expected = numel * (bottom - top + 1) / size
            cap = min(numel, math.ceil(CAND_SLACK * expected) + CAND_EXTRA) if cand_cap is None else cand_cap
            fits = max(0, min(n, budget // (cap * 4))) if cap > 0 else 0  # contributors whose copies fit
            caps[:fits, j] = cap
            budget -= fits * cap * 4
    offs = np.ascontiguousarray((np.cumsum(caps.reshape(-1)) - caps.reshape(-1)).reshape(n, nr), dtype=np.uint64)
    cand = _lazy_u32(int(caps.sum())) if caps.any() else None
    fill = np.zeros((n, nr), dtype=np.uint64)
    while active.any():
        copying = cand is not None
        shift = np.zeros((n, nr), dtype=np.int32)
        for k in range(n):
            for j in range(nr):
                if active[k, j]:
                    shift[k, j] = _shift_for(int(lo[k, j]), int(hi[k, j]))
        above = np.zeros((n, nr), dtype=np.uint64)
        hist = np.zeros((n, nr, BINS), dtype=np.uint64)
        for _lo, _hi, xs, b in stream.chunks():
            if copying:
                bad = mag_range(xs, b, lo, hi, shift, active, above, hist, 0, cand, offs, caps, fill)
            else:
                bad = mag_range(xs, b, lo, hi, shift, active, above, hist)
            stream.check(bad)
        for k in range(n):
            for j, r in enumerate(ranks):
                if not active[k, j]:
                    continue
                copied = copying and int(caps[k, j]) > 0
                cnt_above = int(above[k, j])
                total_in = int(fill[k, j]) if copied else int(hist[k, j].sum())
                if cnt_above >= r:  # a guessed range was too low
                    lo[k, j], hi[k, j] = int(hi[k, j]) + 1, U_MAX
                    continue
                if cnt_above + total_in < r:  # a guessed range was too high
                    lo[k, j], hi[k, j] = 0, int(lo[k, j]) - 1
                    continue
                need = r - cnt_above
                if copied:
                    if cand is not None and total_in <= int(caps[k, j]):  # every value in range was copied
                        off = int(offs[k, j])
                        got = mag_select(cand[off : off + total_in], int(lo[k, j]), int(hi[k, j]), need)
                        res[k, j] = np.array([got], dtype=np.uint32).view(np.float32)[0]
                        active[k, j] = 0
                    continue  # overflow: the next pass histograms the same range
                cum = np.cumsum(hist[k, j][::-1])
                idx = int(np.searchsorted(cum, need))
                b_ix = BINS - 1 - idx
                s = int(shift[k, j])
                new_lo = int(lo[k, j]) + (b_ix << s)
                if s == 0:
                    res[k, j] = np.array([new_lo], dtype=np.uint32).view(np.float32)[0]
                    active[k, j] = 0
                    continue
                lo[k, j], hi[k, j] = new_lo, min(int(hi[k, j]), new_lo + (1 << s) - 1)
        cand = None
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
        # F32: one kernel call per pass over the whole tensor (see in_place_chunk).
        stream = TensorStream(inp, spec, min(in_place_chunk(spec, chunk), MAX_CALL), base=use_base)
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
        flat = empty_f32(numel)  # recycled huge-page mapping when large: no fresh page zeroing
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
