# cython: language_level=3
"""Deterministic symmetric eigensolver.

LAPACK/BLAS results differ in the last bits between builds, CPUs and thread
counts (blocking, vector width, FMA), so SVD-based merges computed with them
would not be byte-identical across replicas. These kernels use IEEE-754 double
``+ - * /`` and ``sqrt`` only, in a fixed order, compiled with
``-ffp-contract=off`` (setup.py): every x86-64 CPU and every thread count gives
the same bits.

``jacobi_eigh`` — cyclic Jacobi (Jacobi 1846; Rutishauser's formulation) on a
symmetric float64 matrix ``A`` (n x n):

* sweep order: rows ``p = 0 .. n-2``, columns ``q = p+1 .. n-1``;
* a pair is skipped (its entry set to exactly 0) when ``a_pq == 0`` or
  ``|a_pq| <= 2^-53 * sqrt(|a_pp|) * sqrt(|a_qq|)`` (it can no longer change
  the diagonal in double precision) or ``|a_pq| < 2^-1000``;
* otherwise ``theta = (a_qq - a_pp) / (2 a_pq)``,
  ``t = sign(theta) / (|theta| + sqrt(theta^2 + 1))`` (``t = 1/(2 theta)``
  when ``|theta| > 2^500``, where ``theta^2`` would overflow; ``sign(0) = +1``),
  ``c = 1 / sqrt(t^2 + 1)``, ``s = t c``; ``a_pp -= t a_pq``,
  ``a_qq += t a_pq``, ``a_pq = a_qp = 0``; rows ``p, q`` of ``A`` and of the
  accumulated rotations get ``(c x_p - s x_q, s x_p + c x_q)``, and the
  columns are copied from the rows (so ``A`` stays exactly symmetric; column
  ``p`` once at the end of row ``p``'s round, since nothing reads it before);
* it stops after the first sweep that rotates nothing, or after
  ``MAX_SWEEPS`` = 60 sweeps (quadratic convergence makes 6-12 the norm for
  n <= 1024; the cap only bounds time on pathological input, and it is part of
  the definition, so even then every replica gets the same bits).

Eigenvalues come back in ascending order, ties by position on the diagonal
(stable sort); each eigenvector is made to have its largest-magnitude
component positive (the first one on ties). Accuracy is that of Jacobi:
eigenvalues to a few ulp of ``||A||``, eigenvectors to about ``ulp * ||A|| /
gap``. Cost: about ``12 n^3`` flops per sweep, single-threaded (each rotation
depends on the previous one); about 0.13 s at n = 256, 1.1 s at n = 512 and
16 s at n = 1024 on the shared 2-core development machine. Rows of the work
matrix are an odd number of cache lines apart, so the column copies do not all
land in one cache set.

The matrix products around it (``matmul``, ``gram``) are in :mod:`meshmerge.cext.gemm`.
"""

import numpy as np
cimport numpy as cnp

from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"

    #define MM_EIG_SKIP 1.1102230246251565e-16   /* 2^-53 */
    #define MM_EIG_TINY 9.332636185032189e-302   /* 2^-1000 */
    #define MM_EIG_HUGE 3.273390607896142e+150   /* 2^500 */

    /* Rows p and q of a row-major n-column matrix get (c x_p - s x_q, s x_p + c x_q). */
    MM_CLONES static void mm_rot_rows(double *restrict xp, double *restrict xq, Py_ssize_t n,
                                      double c, double s)
    {
        for (Py_ssize_t r = 0; r < n; r++) {
            double u = xp[r], v = xq[r];
            xp[r] = c * u - s * v;
            xq[r] = s * u + c * v;
        }
    }

    /* Column q of a from row q, except rows p and q (their entries are set by the caller). */
    static void mm_mirror(double *restrict a, Py_ssize_t n, Py_ssize_t ld, Py_ssize_t p, Py_ssize_t q)
    {
        const double *rq = a + q * ld;
        for (Py_ssize_t r = 0; r < n; r++) {
            if (r != p && r != q) a[r * ld + q] = rq[r];
        }
    }

    /* Cyclic Jacobi on symmetric a (n x n, rows ld apart, overwritten: diagonal = eigenvalues);
       vt (n x n) must hold the identity and receives the eigenvectors as rows.
       Returns the sweeps run, or -1 if MAX_SWEEPS ran out. */
    static int mm_jacobi(double *a, Py_ssize_t ld, double *vt, Py_ssize_t n, int max_sweeps)
    {
        for (int sweep = 1; sweep <= max_sweeps; sweep++) {
            Py_ssize_t rotated = 0;
            for (Py_ssize_t p = 0; p + 1 < n; p++) {
                /* Column p is only read again after this round (row q's entry at column p
                   only feeds positions the rotation overwrites), so it is copied from row p
                   once at the end of the round instead of after every rotation. */
                for (Py_ssize_t q = p + 1; q < n; q++) {
                    double apq = a[p * ld + q];
                    if (apq == 0.0) continue;
                    double app = a[p * ld + p], aqq = a[q * ld + q];
                    if (fabs(apq) <= MM_EIG_SKIP * sqrt(fabs(app)) * sqrt(fabs(aqq))
                        || fabs(apq) < MM_EIG_TINY) {
                        a[p * ld + q] = 0.0;
                        a[q * ld + p] = 0.0;
                        continue;
                    }
                    double theta = (aqq - app) / (2.0 * apq);
                    double t;
                    if (fabs(theta) > MM_EIG_HUGE) {
                        t = 0.5 / theta;
                    } else {
                        t = 1.0 / (fabs(theta) + sqrt(theta * theta + 1.0));
                        if (theta < 0.0) t = -t;
                    }
                    double c = 1.0 / sqrt(t * t + 1.0);
                    double s = t * c;
                    mm_rot_rows(a + p * ld, a + q * ld, n, c, s);
                    mm_rot_rows(vt + p * n, vt + q * n, n, c, s);
                    a[p * ld + p] = app - t * apq;
                    a[q * ld + q] = aqq + t * apq;
                    a[p * ld + q] = 0.0;
                    a[q * ld + p] = 0.0;
                    mm_mirror(a, n, ld, p, q);
                    rotated++;
                }
                for (Py_ssize_t r = 0; r < n; r++) {
                    if (r != p) a[r * ld + p] = a[p * ld + r];
                }
            }
            if (rotated == 0) return sweep;
        }
        return -1;
    }

    """
    int mm_jacobi(double *a, Py_ssize_t ld, double *vt, Py_ssize_t n, int max_sweeps) nogil

#: Sweep cap of the Jacobi iteration (part of the definition of the result).
MAX_SWEEPS = 60


def _square_f64(a, what):
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {arr.shape}")
    if arr.dtype != np.float64:
        raise ValueError(f"{what} must be float64, got {arr.dtype}")
    return arr


def jacobi_eigh(a):
    """Eigen-decomposition of a symmetric float64 matrix: ``(values, vectors)``.

    ``values`` ascending (ties in diagonal order), ``vectors[:, i]`` the unit
    eigenvector of ``values[i]`` with its largest-magnitude component positive.
    Raises ValueError for a non-square, non-symmetric or non-finite matrix.
    """
    arr = _square_f64(a, "matrix")
    if not np.all(np.isfinite(arr)):
        raise ValueError("matrix holds NaN or Inf")
    if not np.array_equal(arr, arr.T):
        raise ValueError("matrix is not exactly symmetric")
    n = arr.shape[0]
    # Rows 64-byte aligned and an odd number of cache lines apart: the column writes
    # then spread over all cache sets (a power-of-two stride would hit one set).
    ld = (n + 7) // 8 * 8
    if ld // 8 % 2 == 0:
        ld += 8
    work = np.zeros((n, ld), dtype=np.float64)
    work[:, :n] = arr
    vt = np.eye(n, dtype=np.float64)
    cdef double[:, ::1] wv = work
    cdef double[:, ::1] vv = vt
    cdef Py_ssize_t nn = n, lld = ld
    cdef int cap = MAX_SWEEPS
    if n > 0:
        with nogil:
            mm_jacobi(&wv[0, 0], lld, &vv[0, 0], nn, cap)
    diag = np.diagonal(work[:, :n]).copy()
    order = np.argsort(diag, kind="stable")
    values = diag[order]
    vectors = vt[order]
    if n > 0:
        lead = np.argmax(np.abs(vectors), axis=1)
        flip = vectors[np.arange(n), lead] < 0.0
        vectors[flip] = -vectors[flip]
    return values, np.ascontiguousarray(vectors.T)

