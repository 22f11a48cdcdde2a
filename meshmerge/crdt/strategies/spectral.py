"""Spectral (SVD-based) merges on a deterministic eigensolver.

LAPACK SVDs differ in the last bits between builds and CPUs, so these
strategies get their singular vectors from :mod:`meshmerge.cext.eigen`
(Householder tridiagonalisation with implicit QL or inverse iteration, and
fixed-order matrix products; IEEE ``+ - * / sqrt`` only):
every replica computes the same bytes. All are task-vector merges
(``delta`` contributions, or ``weights`` with the base model; LoRA A/B factor
contributions are not supported: merging the factors separately is not the
merge of their products) with weights normalised to sum 1 (they must be >= 0
with a positive total).

**Matrix view.** A tensor of shape ``(r, ...)`` is the ``r x c`` matrix with
``c = numel / r``; a 1-D tensor is the ``1 x numel`` matrix. Let ``m =
min(r, c)`` and ``B`` the ``m x L`` orientation (the matrix or its transpose).
The SVD comes from the eigen-decomposition of the ``m x m`` Gram matrix
``B B^T`` (fixed-order float64 products): ``s_j = sqrt(max(lambda_j, 0))``,
left singular vectors = eigenvectors. Rank truncation is the projection
``U_k U_k^T B`` (for ``k > m/2`` computed as ``B - U_r U_r^T B`` with the
``r = m - k`` trailing vectors, the cheaper side), so it never divides by a
small singular value. Precision:
going through the Gram matrix squares the condition number, so singular
values below about ``1e-8 * s_max`` are noise; the truncations here keep the
largest ones, whose subspaces are accurate to about ``1e-16 * s_1^2 /
gap(s_k^2, s_{k+1}^2)``. A vector (``m = 1``) has one singular value, so rank
truncation keeps it whole and ``star``/``adarank`` give the weighted task
average there (crdt-merge switches to magnitude pruning for vectors, a
different method: use ``ties`` or ``breadcrumbs`` for that); for
``svd_knot_tying`` the shared basis of vectors is trivial, so it is TIES (or
the linear average) of the task vectors (crdt-merge: the weighted average).

**Cost and limit.** Per matrix: the Gram (``m^2 L`` multiply-adds, threaded),
an eigensolve and the projection (``2 k m L``). All three take all eigenvalues
but only the vectors they keep (:func:`eigh_top`, single-threaded on the shared
2-core development machine: ~4.3 ms at m = 256, ~29 ms at m = 512, ~0.18 s at
m = 1024 for k = m/2; ~7 ms, ~44 ms, ~0.27 s for every vector, which
``svd_knot_tying`` usually keeps). Contributions are decomposed, and their
products computed, in parallel on the kernel threads. ``m`` is capped at :data:`MAX_RANK` = 1024 so
a merge cannot run for minutes per tensor; larger matrices raise a
StrategyError naming the tensor. Memory: the float64 matrices of one tensor
(for ``svd_knot_tying`` all N task matrices of one tensor at once).

* ``star`` — STAR, "Spectral Truncation and Rescale" (Lee et al., NAACL 2025):
  each task matrix is truncated to its top ``k = max(1, floor(rank_fraction *
  m))`` singular components and rescaled so a norm of the spectrum is kept
  (``rescale``: ``energy`` = Frobenius norm, crdt-merge's default; ``nuclear``
  = sum of singular values, as in the paper; ``none``); then ``b + sum_k w_k
  T_k``. The paper picks ``k`` per matrix from a nuclear-norm fraction
  ``eta``; we take crdt-merge's fixed fraction.
* ``adarank`` — AdaRank (Lee et al. 2025) learns which singular components of
  each task vector to keep by entropy minimisation on unlabeled test data,
  which the merge layer does not have. Data-free proxy (as in crdt-merge):
  keep the smallest rank whose squared singular values reach ``energy`` of
  the total (or a fixed ``target_rank``), no rescale; then ``b + sum_k w_k
  T_k``.
* ``svd_knot_tying`` — KnOTS (Stoica et al., ICLR 2025): the task matrices
  ``B_i`` are concatenated side by side, ``[B_1 .. B_N] = U S [V_1^T .. V_N^T]``
  (one shared basis ``U``; ``B_i = U S V_i^T``, so ``V_i^T = S^-1 U^T B_i``),
  the per-task coordinates ``V_i`` are merged — ``method="ties"`` (the paper's
  KnOTS-TIES: keep each task's top ``density`` fraction by magnitude, elect
  the sign of the weighted sum, average the agreeing entries by their
  weights) or ``"linear"`` (weighted average, which is exactly the weighted
  task-vector average since the basis is shared) — and ``U S V_merged^T`` is
  added to the base. Components with ``s_j^2 <= m * 2^-52 * s_1^2`` carry no
  signal and are dropped. crdt-merge instead Procrustes-rotates each task's
  own left singular vectors onto the first task's, which depends on which
  contribution comes first.
* ``dual_projection`` — dual-projection merging as crdt-merge defines it
  (``DualProjectionMerge``; it cites Yuan et al., NeurIPS 2025, whose
  continual-learning projections need per-task data we do not have): the
  stacked task vectors
  ``D`` (N rows) are split by the projection onto their top ``k = max(1,
  min(N, floor(rank_fraction * N + 1/2)))`` right singular vectors into a
  shared part and a task-specific rest, and the merge is ``b + sum_i w_i
  (shared_i + (1 - stability) rest_i)``. Everything happens in the span of
  the contributions: with ``G = D D^T`` (the model Gram pass of
  :mod:`meshmerge.cext.gram`) and its top eigenvectors ``U_k``, the shared
  part of ``d_i`` is ``D^T U_k U_k^T e_i``, so the merge is ``b + sum_i c_i
  d_i`` with ``c = (1 - stability) w + stability U_k U_k^T w``: one N x N
  eigensolve per tensor, never an SVD of size M.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from meshmerge.cext import get_threads, has_nonfinite
from meshmerge.cext.eigen import eigh, eigh_top
from meshmerge.cext.gemm import gram_rows, matmul
from meshmerge.cext.ties64 import ties_coordinates
from meshmerge.crdt.strategies._combine import combine_tensor, model_gram
from meshmerge.crdt.strategies._stream import (
    TensorStream,
    _flat,
    _widen,
    task_base,
    to_storage,
    unit_sum_weights,
)
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError
from meshmerge.crdt.tensors import TensorSpec

F64 = npt.NDArray[np.float64]

#: Largest min(rows, cols) of a matrix the spectral strategies decompose.
MAX_RANK = 1024
#: Smallest min(rows, cols) for which contributions are decomposed on several threads.
PARALLEL_RANK = 32
#: Fewest elements (all contributions together) for which content_order hashes on several threads.
PARALLEL_HASH = 1 << 20
#: Eigenvalues of the joint Gram at or below ``m * DROP * lambda_max`` are treated as zero.
DROP = 2.0**-52


def _nonfinite(flat: npt.NDArray[Any], dtype: str) -> bool:
    if dtype == "F32":
        return bool(has_nonfinite(np.ascontiguousarray(flat)))
    if dtype == "BF16":
        return bool(np.any((flat & 0x7F80) == 0x7F80))
    return not bool(np.all(np.isfinite(flat)))


def content_digest(inp: MergeInput, k: int) -> bytes:
    """sha256 of contribution k's tensors (in spec order), after checking them."""
    h = hashlib.sha256()
    for spec in inp.specs:
        flat = _flat(inp.tensors[k], spec, f"contribution {k}")
        if _nonfinite(flat, spec.dtype):
            raise StrategyError(
                f"contribution {k} tensor {spec.name!r} holds NaN or Inf; "
                "non-finite contributions cannot be merged"
            )
        h.update(np.ascontiguousarray(flat).view(np.uint8).data)
    return h.digest()


def content_order(inp: MergeInput) -> MergeInput:
    """The same input with contributions sorted by (sha256 of their tensors, weight).

    Sums over contributions in float64 and an eigensolve of a permuted matrix are not
    bit-for-bit invariant under reordering; sorting by content first makes the
    result independent of the order the contributions come in. Also checks
    every contribution's tensors (shape, dtype, NaN/Inf) under its original index.
    """
    n = len(inp.tensors)
    elements = n * sum(spec.numel for spec in inp.specs)
    workers = min(get_threads(), n) if elements >= PARALLEL_HASH else 1
    if workers > 1:  # hashlib and the NaN scan release the GIL; errors still come in index order
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda k: content_digest(inp, k), range(n)))
    else:
        digests = [content_digest(inp, k) for k in range(n)]
    keys = [(d, float(inp.weights[k])) for k, d in enumerate(digests)]
    order = sorted(range(len(keys)), key=lambda k: keys[k])
    return MergeInput(
        [inp.tensors[k] for k in order],
        [inp.weights[k] for k in order],
        inp.kind,
        inp.specs,
        inp.seed,
        inp.base,
    )


def ordered_weights(inp: MergeInput) -> tuple[MergeInput, list[float]]:
    """The input in :func:`content_order` and its normalised weights in that order; bad
    weights are rejected before any tensor is read."""
    unit_sum_weights(inp, "spectral merges")
    ordered = content_order(inp)
    return ordered, unit_sum_weights(ordered, "spectral merges")


class TaskMatrices:
    """The task matrices ``x_k - b`` (or ``x_k``) of one tensor in the ``m x L`` orientation.

    Contributions must have passed :func:`content_order` (which checks them).
    """

    def __init__(self, inp: MergeInput, spec: TensorSpec, use_base: bool, strategy: str) -> None:
        self.spec = spec
        self.stream = TensorStream(inp, spec, max(8, spec.numel), base=use_base)
        rows = spec.shape[0] if len(spec.shape) >= 2 else 1
        cols = spec.numel // rows if rows else 0
        self.transposed = rows > cols
        self.m = min(rows, cols)
        self.rows, self.cols = rows, cols
        if self.m > MAX_RANK:
            raise StrategyError(
                f"{strategy}: tensor {spec.name!r} is a {rows}x{cols} matrix; the deterministic SVD "
                f"is limited to min(rows, cols) <= {MAX_RANK} (cost grows as min^3)"
            )
        self.base: F64 | None = None
        if self.stream.base is not None:
            b = _widen(self.stream.base, spec.dtype, 0, spec.numel)
            if has_nonfinite(b):
                raise StrategyError(f"base model tensor {spec.name!r} holds NaN or Inf")
            self.base = b.astype(np.float64)

    def __len__(self) -> int:
        return len(self.stream.flats)

    def get(self, k: int) -> F64:
        """Task matrix k, fresh (the caller may overwrite it); a transposed view when rows > cols
        (the kernels take strided views, so the transpose costs no copy)."""
        x = _widen(self.stream.flats[k], self.spec.dtype, 0, self.spec.numel)
        # float64(x) - base in one pass; the widening is exact, so the bytes are those of
        # x.astype(float64) - base.
        v = x.astype(np.float64) if self.base is None else np.subtract(x, self.base, dtype=np.float64)
        mat = v.reshape(self.rows, self.cols)
        return mat.T if self.transposed else mat

    def finish(self, delta: F64) -> npt.NDArray[Any]:
        flat = (delta.T if self.transposed else delta).reshape(-1)
        if self.base is not None:
            flat = self.base + flat
        return to_storage(flat.astype(np.float32), self.spec)


def spectrum(g: F64) -> tuple[list[float], F64]:
    """Eigenvalues (clipped at 0) and eigenvectors (columns) of a Gram matrix, largest first."""
    vals, vecs = eigh(g)
    lam = [max(0.0, float(x)) for x in vals[::-1]]
    return lam, np.ascontiguousarray(vecs[:, ::-1])


def project(u: F64, k: int, b: F64, threads: int = 0) -> F64:
    """``U_k U_k^T B``: B's component in the span of the first k columns of U
    (``threads`` as for :func:`matmul`)."""
    uk = u[:, :k]
    return matmul(uk, matmul(uk.T, b, threads=threads), threads=threads)


def accumulate(acc: F64 | None, part: F64) -> F64:
    """``acc + part`` in place (part itself when acc is None): part is consumed. Callers
    scale each part first, ``np.multiply(part, w, out=part)``: the same roundings as
    ``acc + w * part``, and the scaling can run on the worker that made the part."""
    if acc is None:
        return part
    return np.add(acc, part, out=acc)


@dataclass(frozen=True)
class StarParams(Params):
    """rank_fraction: share of each matrix's singular components kept (at least one);
    rescale: which norm of the spectrum the truncation keeps ("energy", "nuclear", "none")."""

    rank_fraction: float = 0.5
    rescale: str = "energy"

    def validate(self) -> None:
        self._number("rank_fraction", 0.0, 1.0, lo_open=True)
        self._choice("rescale", ("energy", "nuclear", "none"))


def star_factor(lam: list[float], k: int, rescale: str) -> float:
    if rescale == "energy":
        kept = math.fsum(lam[:k])
        return math.sqrt(math.fsum(lam) / kept) if kept > 0.0 else 1.0
    if rescale == "nuclear":
        s = [math.sqrt(x) for x in lam]
        kept = math.fsum(s[:k])
        return math.fsum(s) / kept if kept > 0.0 else 1.0
    return 1.0


class _Truncating(Strategy):
    """Per-contribution rank truncation, then the weighted sum of the truncated task matrices."""

    def rank(self, lam: list[float], params: Any) -> tuple[int, float]:
        raise NotImplementedError

    def merge(self, inp: MergeInput, params: Any, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        inp, w = ordered_weights(inp)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            mats = TaskMatrices(inp, spec, use_base, self.name)

            # Contributions are independent (the kernels release the GIL), so matrices worth
            # it run on the kernel threads, each product then on one thread (kernel threads
            # inside pool threads would put twice as many threads as cores to work); the sum
            # is still taken in contribution order.
            workers = min(get_threads(), len(mats)) if mats.m >= PARALLEL_RANK else 1
            inner = 1 if workers > 1 else 0

            def truncated(k: int, mats: TaskMatrices = mats, inner: int = inner) -> F64:
                b = mats.get(k)
                chosen: list[tuple[int, float]] = []

                def choose(vals: F64) -> int:
                    chosen.append(self.rank([max(0.0, float(x)) for x in vals], params))
                    rank = chosen[0][0]
                    return rank if rank < mats.m else 0  # full rank: no projection, no vectors

                _, u = eigh_top(gram_rows(b, threads=inner), choose, complement=True, threads=inner)
                rank, factor = chosen[0]
                if rank >= mats.m:
                    part = b
                elif u.shape[1] == rank:
                    part = project(u, rank, b, inner)
                else:  # u holds the trailing m - rank vectors: b - U U^T b
                    part = project(u, u.shape[1], b, inner)
                    np.subtract(b, part, out=part)
                return np.multiply(part, w[k] * factor, out=part)

            acc: F64 | None = None
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = pool.map(truncated, range(len(mats))) if workers > 1 else map(truncated, range(len(mats)))
                for part in parts:
                    acc = accumulate(acc, part)
            assert acc is not None
            out[spec.name] = mats.finish(acc)
        return out


class Star(_Truncating):
    name = "star"
    params_type = StarParams

    def rank(self, lam: list[float], params: StarParams) -> tuple[int, float]:
        k = max(1, math.floor(params.rank_fraction * len(lam)))
        return k, star_factor(lam, k, params.rescale)


@dataclass(frozen=True)
class AdaRankParams(Params):
    """energy: share of the squared singular values the kept rank must reach;
    target_rank: a fixed rank instead (None: choose by energy)."""

    energy: float = 0.9
    target_rank: int | None = None

    def validate(self) -> None:
        self._number("energy", 0.0, 1.0, lo_open=True)
        if self.target_rank is not None:
            self._integer("target_rank", 1, 1 << 30)


def energy_rank(lam: list[float], energy: float) -> int:
    """Smallest k with ``sum(lam[:k]) >= energy * sum(lam)`` (sums correctly rounded)."""
    goal = energy * math.fsum(lam)
    # lam >= 0, so the exact prefix sums never decrease, and neither do their correctly
    # rounded values: the first k that reaches the goal is found by bisection.
    lo, hi = 1, len(lam)
    if not lam or math.fsum(lam) < goal:
        return len(lam)
    while lo < hi:
        mid = (lo + hi) // 2
        if math.fsum(lam[:mid]) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo


class AdaRank(_Truncating):
    name = "adarank"
    params_type = AdaRankParams

    def rank(self, lam: list[float], params: AdaRankParams) -> tuple[int, float]:
        if params.target_rank is not None:
            return min(params.target_rank, len(lam)), 1.0
        return energy_rank(lam, params.energy), 1.0


@dataclass(frozen=True)
class KnotParams(Params):
    """method: how the per-task coordinates in the shared basis merge ("ties" or "linear");
    density: share of each task's coordinates TIES keeps (by magnitude)."""

    method: str = "ties"
    density: float = 0.5

    def validate(self) -> None:
        self._choice("method", ("ties", "linear"))
        self._number("density", 0.0, 1.0, lo_open=True)


class SvdKnotTying(Strategy):
    name = "svd_knot_tying"
    params_type = KnotParams

    def merge(self, inp: MergeInput, params: KnotParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        inp, w = ordered_weights(inp)
        out: dict[str, Any] = {}
        for spec in inp.specs:
            mats = TaskMatrices(inp, spec, use_base, self.name)
            # As in _Truncating: contributions on the kernel threads, one thread per product;
            # sums are still taken in contribution order, so the bytes do not change.
            workers = min(get_threads(), len(mats)) if mats.m >= PARALLEL_RANK else 1
            if workers > 1:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    out[spec.name] = self._tensor(mats, w, params, pool.map, 1)
            else:
                out[spec.name] = self._tensor(mats, w, params, map, 0)
        return out

    def _tensor(self, mats: TaskMatrices, w: list[float], params: KnotParams,
                run: Callable[..., Iterator[Any]], inner: int) -> npt.NDArray[Any]:
        """One tensor's merge; ``run`` maps over contributions (in order), ``inner`` is
        the thread count of each product (as for :func:`matmul`)."""
        bs = list(run(mats.get, range(len(mats))))
        if params.method == "linear":
            acc: F64 | None = None
            for wk, b in zip(w, bs, strict=True):
                acc = accumulate(acc, np.multiply(b, wk, out=b))
            assert acc is not None
            return mats.finish(acc)
        g: F64 | None = None
        for part in run(lambda b: gram_rows(b, threads=inner), bs):
            g = part if g is None else np.add(g, part, out=g)
        assert g is not None
        def live(vals: F64) -> int:
            """Components above ``m * DROP * lambda_max`` (a prefix: vals are descending)."""
            top = float(vals[0]) if len(vals) else 0.0
            return sum(1 for x in vals if x > mats.m * DROP * top) if top > 0.0 else 0

        vals, ur = eigh_top(g, live)
        r = ur.shape[1]
        if r == 0:
            return mats.finish(np.zeros_like(bs[0]))
        s = np.array([math.sqrt(float(vals[j])) for j in range(r)])
        urt = np.ascontiguousarray(ur.T)

        def coordinates(b: F64) -> F64:
            v = matmul(urt, b, threads=inner)
            v /= s[:, None]
            return v

        merged = ties_coordinates(list(run(coordinates, bs)), w, params.density)
        return mats.finish(matmul(ur, np.multiply(merged, s[:, None], out=merged)))


@dataclass(frozen=True)
class DualProjectionParams(Params):
    """stability: share of the task-specific (non-shared) part dropped (1: shared part only);
    rank_fraction: share of the N singular directions that form the shared subspace."""

    stability: float = 0.5
    rank_fraction: float = 0.5

    def validate(self) -> None:
        self._number("stability", 0.0, 1.0)
        self._number("rank_fraction", 0.0, 1.0, lo_open=True)


def dual_coefficients(g: F64, w: list[float], params: DualProjectionParams) -> list[float]:
    """``(1 - stability) w + stability U_k U_k^T w`` for the Gram matrix g of the task vectors."""
    n = len(w)
    k = max(1, min(n, math.floor(params.rank_fraction * n + 0.5)))
    _, u = spectrum(np.ascontiguousarray(g))
    uk = [[float(u[i, j]) for j in range(k)] for i in range(n)]
    proj_w = [math.fsum(uk[i][j] * math.fsum(uk[t][j] * w[t] for t in range(n)) for j in range(k))
              for i in range(n)]
    return [(1.0 - params.stability) * w[i] + params.stability * proj_w[i] for i in range(n)]


class DualProjection(Strategy):
    name = "dual_projection"
    params_type = DualProjectionParams

    def merge(self, inp: MergeInput, params: DualProjectionParams, chunk: int) -> dict[str, Any]:
        use_base = task_base(inp, self.name)
        inp, w = ordered_weights(inp)
        grams = model_gram(inp, chunk, base=use_base)
        return {
            spec.name: combine_tensor(
                inp, spec, np.array(dual_coefficients(g, w, params)), chunk, base=use_base
            )
            for spec, g in zip(inp.specs, grams, strict=True)
        }
