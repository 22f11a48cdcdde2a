"""The deterministic eigensolver (Householder + QL, inverse iteration) against numpy/LAPACK.

Tolerances: our QL and LAPACK's eigh both compute eigenvalues to a small
multiple of ``eps * ||A||``; we allow ``1e-13 * n * ||A||_max``. Eigenvectors
are compared through residuals ``||A v - lambda v||`` and orthogonality (same
bound), and directly against LAPACK's (up to its sign) where eigenvalues are
well separated (``1e-9`` for gaps above ``1e-3 * ||A||``). The products
(``matmul``) are tested in test_gemm.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from meshmerge.cext import eigh, eigh_top, matmul
from tests.crdt.strategies.helpers import det_values


def sym(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a + a.T


def check_decomposition(a: np.ndarray, vals: np.ndarray, vecs: np.ndarray) -> None:
    n = a.shape[0]
    scale = max(1.0, float(np.max(np.abs(a))))
    tol = 1e-13 * max(n, 1) * scale
    ref = np.linalg.eigvalsh(a)
    assert np.all(np.diff(vals) >= 0)
    assert np.max(np.abs(vals - ref), initial=0.0) <= tol
    assert np.max(np.abs(a @ vecs - vecs * vals), initial=0.0) <= tol
    assert np.max(np.abs(vecs.T @ vecs - np.eye(n)), initial=0.0) <= 1e-13 * max(n, 1)
    # sign rule: each eigenvector's largest-magnitude component (first on ties) is positive
    for i in range(n):
        lead = int(np.argmax(np.abs(vecs[:, i])))
        assert vecs[lead, i] > 0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 64, 100])
def test_random_symmetric_matches_lapack(n: int) -> None:
    a = sym(n, n)
    vals, vecs = eigh(a)
    check_decomposition(a, vals, vecs)
    ref_vals, ref_vecs = np.linalg.eigh(a)
    scale = float(np.max(np.abs(a)))
    for i in range(n):
        gap = min([abs(ref_vals[i] - ref_vals[j]) for j in range(n) if j != i], default=np.inf)
        if gap > 1e-3 * scale:
            v = ref_vecs[:, i] * np.sign(ref_vecs[np.argmax(np.abs(ref_vecs[:, i])), i])
            assert np.max(np.abs(vecs[:, i] - v)) <= 1e-9


def test_positive_semidefinite_gram() -> None:
    b = np.random.default_rng(3).standard_normal((40, 90))
    g = b @ b.T
    g = np.triu(g) + np.triu(g, 1).T  # exactly symmetric
    vals, vecs = eigh(g)
    check_decomposition(g, vals, vecs)
    s = np.sqrt(vals[::-1])
    assert np.allclose(s, np.linalg.svd(b, compute_uv=False), rtol=1e-12, atol=1e-12 * s[0])


def test_repeated_eigenvalues() -> None:
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((6, 6)))
    a = q @ np.diag([1.0, 1.0, 1.0, 2.0, 2.0, 3.0]) @ q.T
    a = np.triu(a) + np.triu(a, 1).T
    vals, vecs = eigh(a)
    check_decomposition(a, vals, vecs)
    assert np.allclose(vals, [1, 1, 1, 2, 2, 3], atol=1e-14)


def test_zero_and_diagonal_matrices() -> None:
    vals, vecs = eigh(np.zeros((4, 4)))
    assert vals.tolist() == [0.0] * 4 and vecs.tolist() == np.eye(4).tolist()
    # ties keep diagonal order; vectors are the unit vectors, no rotation happens
    vals, vecs = eigh(np.diag([3.0, -1.0, 3.0, 0.5]))
    assert vals.tolist() == [-1.0, 0.5, 3.0, 3.0]
    assert vecs.tolist() == np.eye(4)[:, [1, 3, 0, 2]].tolist()


def test_one_by_one_and_empty() -> None:
    vals, vecs = eigh(np.array([[-2.5]]))
    assert vals.tolist() == [-2.5] and vecs.tolist() == [[1.0]]
    vals, vecs = eigh(np.zeros((0, 0)))
    assert vals.shape == (0,) and vecs.shape == (0, 0)


def test_extreme_scales() -> None:
    for scale in (1e-150, 1e150):
        a = sym(12, 9) * scale
        vals, vecs = eigh(a)
        ref = np.linalg.eigvalsh(a)
        assert np.all(np.isfinite(vals)) and np.all(np.isfinite(vecs))
        assert np.max(np.abs(vals - ref)) <= 1e-12 * np.max(np.abs(ref))


def test_large_gram_matches_lapack() -> None:
    """The sizes the spectral merges use: a 256 x 256 Gram of a 256 x 1024 task matrix."""
    b = np.random.default_rng(21).standard_normal((256, 1024))
    g = matmul(b, np.ascontiguousarray(b.T))
    vals, vecs = eigh(g)
    check_decomposition(g, vals, vecs)


def test_rank_deficient_gram() -> None:
    """Many (numerically) zero eigenvalues: the rank-20 Gram of a 120 x 20 matrix."""
    b = np.random.default_rng(22).standard_normal((120, 20))
    g = matmul(b, np.ascontiguousarray(b.T))
    vals, vecs = eigh(g)
    check_decomposition(g, vals, vecs)
    assert np.max(np.abs(vals[:100])) <= 1e-12 * vals[-1]
    assert np.allclose(vals[100:], np.linalg.eigvalsh(b.T @ b), rtol=1e-12)


def test_wilkinson_matrix_close_pairs() -> None:
    """Wilkinson's W21+: pairs of eigenvalues that agree to ~1e-14 (hard for shifts)."""
    n = 21
    a = np.diag(np.abs(np.arange(n) - 10.0)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    vals, vecs = eigh(a)
    check_decomposition(a, vals, vecs)


def test_graded_matrix() -> None:
    """Entries spanning 60 orders of magnitude along the diagonal."""
    n = 30
    d = 10.0 ** -np.linspace(0, 60, n)
    a = np.sqrt(np.outer(d, d)) * sym(n, 23) / 10.0 + np.diag(d)
    vals, vecs = eigh(a)
    check_decomposition(a, vals, vecs)


def test_reconstruction() -> None:
    a = sym(30, 11)
    vals, vecs = eigh(a)
    assert np.max(np.abs(vecs @ np.diag(vals) @ vecs.T - a)) <= 1e-12 * np.max(np.abs(a))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        eigh(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="float64"):
        eigh(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="symmetric"):
        eigh(np.array([[1.0, 2.0], [2.5, 1.0]]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        eigh(np.array([[1.0, np.nan], [np.nan, 1.0]]))


def test_same_bits_every_run_and_golden() -> None:
    """A fixed input from our own PRNG: the eigen-decomposition's bytes are pinned."""
    v = det_values("eigen/golden", 48 * 48).astype(np.float64).reshape(48, 48)
    a = v + v.T
    vals, vecs = eigh(a)
    again = eigh(a.copy())
    assert vals.tobytes() == again[0].tobytes() and vecs.tobytes() == again[1].tobytes()
    digest = hashlib.sha256(vals.tobytes() + vecs.tobytes()).hexdigest()
    assert digest == GOLDEN_EIGEN


GOLDEN_EIGEN = "3583489ce9229e07f6dc73115e9e78d384612b5267f9f926986fd2354b68f601"


def check_top(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """eigh_top's values (all, largest first) and k vectors: residuals, orthonormality, sign rule."""
    n = a.shape[0]
    vals, u = eigh_top(a, lambda v: k)
    scale = max(1.0, float(np.max(np.abs(a))))
    tol = 1e-13 * max(n, 1) * scale
    assert vals.shape == (n,) and u.shape == (n, k)
    assert np.all(np.diff(vals) <= 0)
    assert np.max(np.abs(vals - np.linalg.eigvalsh(a)[::-1]), initial=0.0) <= tol
    assert np.max(np.abs(a @ u - u * vals[:k]), initial=0.0) <= tol
    assert np.max(np.abs(u.T @ u - np.eye(k)), initial=0.0) <= 1e-13 * max(n, 1)
    for i in range(k):
        lead = int(np.argmax(np.abs(u[:, i])))
        assert u[lead, i] > 0
    return vals, u


@pytest.mark.parametrize("n", [1, 2, 3, 7, 33, 100, 256])
def test_top_vectors_span_lapacks_leading_subspace(n: int) -> None:
    b = np.random.default_rng(30 + n).standard_normal((n, 2 * n + 5))
    g = matmul(b, np.ascontiguousarray(b.T))
    for k in sorted({0, 1, n // 2, n}):
        _, u = check_top(g, k)
        ref = np.linalg.eigh(g)[1][:, ::-1][:, :k]
        # Gram eigenvalues are well separated here: the projectors agree to rounding
        assert np.max(np.abs(u @ u.T - ref @ ref.T), initial=0.0) <= 1e-10


@pytest.mark.parametrize("n", [2, 7, 100, 256])
def test_complement_gives_the_trailing_side(n: int) -> None:
    """k > n/2 with complement: the n - k trailing vectors, smallest first; I - U U^T is the
    leading projector; k <= n/2 still gives the leading ones."""
    b = np.random.default_rng(40 + n).standard_normal((n, 2 * n + 5))
    g = matmul(b, np.ascontiguousarray(b.T))
    ref_vecs = np.linalg.eigh(g)[1]
    for k in sorted({n // 2, n // 2 + 1, n - 1, n}):
        vals, u = eigh_top(g, lambda v, k=k: k, complement=True)
        want = n - k if n - k < k else k
        assert u.shape == (n, want)
        if want < k:
            assert np.max(np.abs(g @ u - u * vals[k:][::-1]), initial=0.0) <= 1e-13 * n * np.max(np.abs(g))
            lead = ref_vecs[:, ::-1][:, :k]
            assert np.max(np.abs((np.eye(n) - u @ u.T) - lead @ lead.T)) <= 1e-10
        assert np.max(np.abs(u.T @ u - np.eye(want)), initial=0.0) <= 1e-13 * n


def test_top_vectors_in_clusters_and_null_spaces() -> None:
    """Cut clusters get an orthonormal basis of eigenvectors (any basis is right there)."""
    q, _ = np.linalg.qr(np.random.default_rng(31).standard_normal((40, 40)))
    a = q @ np.diag(np.repeat([3.0, 2.0, 1.0, 0.5], 10)) @ q.T
    a = np.triu(a) + np.triu(a, 1).T
    for k in (5, 10, 15, 40):
        check_top(a, k)
    b = np.random.default_rng(32).standard_normal((120, 20))
    check_top(matmul(b, np.ascontiguousarray(b.T)), 60)  # 40 of the 100 zero eigenvalues
    n = 21
    w = np.diag(np.abs(np.arange(n) - 10.0)) + np.diag(np.ones(n - 1), 1) + np.diag(np.ones(n - 1), -1)
    check_top(w, 10)
    vals, u = eigh_top(np.zeros((5, 5)), lambda v: 3)
    assert vals.tolist() == [0.0] * 5 and np.allclose(u.T @ u, np.eye(3), atol=1e-15)


def test_top_choose_sees_the_values_and_is_checked() -> None:
    a = sym(9, 33)
    seen: list[np.ndarray] = []

    def energy(v: np.ndarray) -> int:
        seen.append(v)
        return 4

    vals, u = eigh_top(a, energy)
    assert seen[0].tolist() == vals.tolist() and u.shape == (9, 4)
    for bad in (-1, 10, 2.0, True, None):
        with pytest.raises(ValueError, match="choose"):
            eigh_top(a, lambda v, bad=bad: bad)
    with pytest.raises(ValueError, match="symmetric"):
        eigh_top(np.array([[1.0, 2.0], [2.5, 1.0]]), lambda v: 1)
    vals, u = eigh_top(np.zeros((0, 0)), lambda v: 0)
    assert vals.shape == (0,) and u.shape == (0, 0)


def test_top_same_bits_every_run_and_golden() -> None:
    v = det_values("eigen/golden", 48 * 48).astype(np.float64).reshape(48, 48)
    a = v + v.T
    vals, u = eigh_top(a, lambda v: 20)
    again = eigh_top(a.copy(), lambda v: 20)
    assert vals.tobytes() == again[0].tobytes() and u.tobytes() == again[1].tobytes()
    assert hashlib.sha256(vals.tobytes() + u.tobytes()).hexdigest() == GOLDEN_TOP


GOLDEN_TOP = "c219ad33932365991e02058d8d7357f2fc77c7bc58f6eee0b8a7c850c8488618"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_top_vector_groups_same_bits_for_any_thread_count(threads: int) -> None:
    """k = 70 and 33 at n = 96 take both back-transformation paths (groups of 32 and a
    narrower last group) and side-by-side inverse iteration; the golden was computed by
    the one-vector-at-a-time implementation these replaced, so it also pins that the
    restructuring changed no bit."""
    v = det_values("eigen/golden-wide", 96 * 96).astype(np.float64).reshape(96, 96)
    a = v @ v.T
    h = hashlib.sha256()
    for k in (70, 33):
        vals, u = eigh_top(a, lambda v, k=k: k, threads=threads)
        h.update(vals.tobytes() + u.tobytes())
    assert h.hexdigest() == GOLDEN_TOP_WIDE


GOLDEN_TOP_WIDE = "f2566643c964c91330c461ae186d34d72dad2ef9d9c0990f02e5dfb30841410d"


def awkward_matrix(rng: np.random.Generator, kind: int, n: int) -> np.ndarray:
    """Symmetric test matrices of the kinds that break eigensolvers."""
    if kind == 0:
        a = rng.integers(-2, 3, (n, n)).astype(float)  # repeated and zero entries
    elif kind == 1:
        a = np.ones((n, n)) * rng.standard_normal()  # rank 1
    elif kind == 2:
        a = rng.standard_normal((n, n)) * 10.0 ** rng.integers(-300, 300, (n, n))  # 600 decades
    elif kind == 3:
        b = rng.standard_normal((n, max(1, n // 4)))
        a = b @ b.T  # a big null space
    elif kind == 4:
        a = np.diag(rng.integers(0, 3, n).astype(float)) + 1e-12 * rng.standard_normal((n, n))
    else:
        a = np.kron(np.eye(n // 4 + 1), rng.standard_normal((4, 4)))[:n, :n]  # decoupled blocks
    return np.triu(a) + np.triu(a, 1).T


@pytest.mark.parametrize("kind", range(6))
def test_awkward_matrices_converge_accurately(kind: int) -> None:
    """Fixed-seed sweep: both solvers converge, with residuals and orthogonality near eps.

    (The 600-decade kind once broke the reduction: a tiny column made tau overflow.)"""
    rng = np.random.default_rng(50 + kind)
    for case in range(60):
        n = int(rng.integers(1, 41))
        a = awkward_matrix(rng, kind, n)
        scale = float(np.max(np.abs(a)))
        if not np.isfinite(scale) or scale == 0.0:
            continue
        tol = 1e-13 * n * scale
        vals, vecs = eigh(a)
        assert np.max(np.abs(a @ vecs - vecs * vals)) <= tol, (kind, case)
        assert np.max(np.abs(vecs.T @ vecs - np.eye(n))) <= 1e-13 * n, (kind, case)
        k = int(rng.integers(0, n + 1))
        tvals, u = eigh_top(a, lambda v, k=k: k, complement=bool(case % 2))
        if u.shape[1]:
            own = tvals[:k] if u.shape[1] == k else tvals[k:][::-1]
            assert np.max(np.abs(a @ u - u * own)) <= tol, (kind, case, k)
            assert np.max(np.abs(u.T @ u - np.eye(u.shape[1]))) <= 1e-13 * n, (kind, case, k)
