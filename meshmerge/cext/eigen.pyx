# cython: language_level=3
"""Deterministic symmetric eigensolver.

LAPACK/BLAS results differ in the last bits between builds, CPUs and thread
counts (blocking, vector width, FMA), so SVD-based merges computed with them
would not be byte-identical across replicas. These kernels use IEEE-754 double
``+ - * /`` and ``sqrt`` only, in a fixed order, compiled with
``-ffp-contract=off`` (setup.py): every x86-64 CPU and every thread count gives
the same bits.

``eigh`` — Householder tridiagonalisation, then the implicit QL iteration with
Wilkinson-type shifts (the classic symmetric QL method; about ``9 n^3`` flops
against Jacobi's ``~60 n^3``), on a symmetric float64 matrix ``A`` (n x n):

* scaling: ``A`` is multiplied by the power of two ``2^s`` that puts
  ``max |a_ij|`` in ``[1, 2)`` (exact), so no square below over- or underflows
  in a way that matters; eigenvalues are scaled back by ``2^-s`` at the end;
* reduction, ``k = 0 .. n-3``, on the upper triangle only: ``x = A[k, k+1:]``;
  if ``x_1.. == 0`` nothing happens (``e_k = x_0``); otherwise, with ``c =
  max |x_i|``, ``mu = c * sqrt(sum_i (x_i / c)^2)`` (ascending), ``beta = -mu``
  if ``x_0 >= 0`` else ``mu``, ``tau = (beta - x_0) / beta``, ``v = (1, x_1 /
  (x_0 - beta), ..)``, ``e_k = beta`` (LAPACK's normalisation: no column,
  however tiny or huge, over- or underflows); ``p = tau * A22 v``, where row
  ``i`` of the triangle adds ``v_i A22[i, i:]`` to ``p[i:]`` and then
  ``A22[i, i+1:] . v[i+1:]`` to ``p_i`` (rows in order; the dot product in eight fixed lanes
  ``j mod 8``, combined as ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``); ``K = tau
  / 2 * sum_i p_i v_i``, ``w = p - K v`` and ``A22[i, j] -= v_i w_j + w_i v_j``
  for ``j >= i``;
* ``Q = H_0 .. H_{n-3}`` by backward accumulation (``r = sum_i v_i Q[i, :]``,
  then ``Q[i, :] -= (tau v_i) r``); both the reduction and the accumulation
  compute the next step's sum in the same pass over the rows as this step's
  update (same operations, one pass);
* QL on the tridiagonal ``(d, e)``, twice: first without vectors, which gives
  its eigenvalues ``mu_l`` in the order they settle at positions ``l``; then
  with vectors, where the first step at position ``l`` is shifted by ``mu_l``
  (mostly settling it in one step: about a quarter fewer rotations on the
  vectors, which are most of the cost). For ``l = 0 .. n-1`` the block ends at
  the first ``m >= l`` with ``|e_m| <= 2^-53 max_i (|d_i| + |e_i|)`` (of the
  tridiagonal as the QL pass starts: a perturbation of ``eps ||T||``, which
  is what backward stability allows; a test relative to the neighbouring
  ``d`` never fires in a cluster of eigenvalues at the rounding level, such as
  the zero eigenvalues of a rank-deficient Gram); while ``m > l`` one
  implicit QL step (later steps shifted by the Wilkinson-type shift from
  ``d_l, d_l+1, e_l``) runs plane rotations from ``m-1`` down to ``l``
  (their lengths by a scaled ``sqrt(f^2 + g^2)``, no libm ``hypot``), applied to the rows of ``Q^T`` four at a time in one pass; more
  than ``MAX_ITERATIONS`` = 60 steps for one eigenvalue raise (LAPACK allows
  30 on average);
* eigenvalues ascending, ties by position on the tridiagonal's diagonal
  (stable sort); each eigenvector is made to have its largest-magnitude
  component positive (the first one on ties).

Accuracy is that of a backward-stable method: eigenvalues to a small multiple
of ``eps * ||A||``, eigenvectors to about ``eps * ||A|| / gap``. Cost,
single-threaded, on the shared 2-core development machine: about 8 ms at
n = 256 and 60-66 ms at n = 512 (single-threaded LAPACK eigh: 6.5 and 36 ms;
the cyclic Jacobi solver used before: 132 and 934 ms).

``eigh_top`` — all eigenvalues (the same reduction, then QL without vectors)
and the unit eigenvectors of the k largest only, by inverse iteration on the
tridiagonal form: per eigenvalue (descending) one LU factorisation of ``T -
sigma I`` with partial pivoting (pivots below ``2^-53 ||T||`` in magnitude
replaced by that value, sign kept), two solves from a fixed start vector, each
followed by normalisation and, twice, modified Gram-Schmidt against the earlier
vectors of its cluster and normalisation again (a cluster: eigenvalues closer
than ``1e-3 ||T||`` to the previous one; shifts in a cluster are kept
``10 * 2^-53 ||T||`` apart);
every vector must then satisfy ``|T x - lambda x| <= 16 n 2^-53 ||T||`` in each
component (true for everything but extremely graded matrices, where replaced
pivots hide eigenvalues far below ``eps ||T||``; then the vectors come from
:func:`eigh` instead, deterministically); then the vectors go back through the
reflections (``n^2 k`` multiply-adds). Vectors that each start a cluster are
computed up to four side by side (independent chains of divisions interleave),
and the reflections are applied to groups of 32 vectors, one group per thread;
each value still gets the same operations in the same order, so neither
changes a bit. Single-threaded, with LAPACK eigh at 6.8 / 44 / 226 ms: 4.3 ms
at n = 256, 29 ms at n = 512, 0.18 s at n = 1024 for k = n/2; 7.0 / 44 / 275 ms
for all n vectors (``scripts/bench/eigen.py``). For ``k > n/2`` it can give the
``n - k`` trailing vectors instead (the leading ones of ``-T``).

The matrix products around it (``matmul``, ``gram``) are in :mod:`meshmerge.cext.gemm`.
"""

import math

import numpy as np
cimport numpy as cnp

from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"

    #define MM_EIG_SKIP 1.1102230246251565e-16   /* 2^-53 */
    #define MM_EIG_SMALL 3.054936363499605e-151  /* 2^-500 */
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

    /* Four consecutive rotations of a QL step, i = top-1 .. top-4, in one pass over the rows
       top-4 .. top: the running row stays in a register between them (same operations in the
       same order as four mm_rot_rows calls, a third of the memory traffic). */
    MM_CLONES static void mm_rot4(double *zt, Py_ssize_t n, Py_ssize_t top, const double *c,
                                  const double *s)
    {
        double *restrict x0 = zt + (top - 4) * n, *restrict x1 = zt + (top - 3) * n;
        double *restrict x2 = zt + (top - 2) * n, *restrict x3 = zt + (top - 1) * n;
        double *restrict x4 = zt + top * n;
        double c0 = c[top - 4], c1 = c[top - 3], c2 = c[top - 2], c3 = c[top - 1];
        double s0 = s[top - 4], s1 = s[top - 3], s2 = s[top - 2], s3 = s[top - 1];
        for (Py_ssize_t j = 0; j < n; j++) {
            double v = x4[j], u = x3[j];
            x4[j] = s3 * u + c3 * v;
            v = c3 * u - s3 * v;
            u = x2[j];
            x3[j] = s2 * u + c2 * v;
            v = c2 * u - s2 * v;
            u = x1[j];
            x2[j] = s1 * u + c1 * v;
            v = c1 * u - s1 * v;
            u = x0[j];
            x1[j] = s0 * u + c0 * v;
            x0[j] = c0 * u - s0 * v;
        }
    }

    /* The rotations i = hi-1 down to lo of one QL step on the rows of zt. */
    static void mm_rot_chain(double *zt, Py_ssize_t n, Py_ssize_t hi, Py_ssize_t lo,
                             const double *c, const double *s)
    {
        Py_ssize_t top = hi;
        for (; top - 4 >= lo; top -= 4) mm_rot4(zt, n, top, c, s);
        for (Py_ssize_t i = top - 1; i >= lo; i--)
            mm_rot_rows(zt + i * n, zt + (i + 1) * n, n, c[i], s[i]);
    }

    /* y[j] += f * x[j]. */
    MM_CLONES static void mm_axpy(double *restrict y, const double *restrict x, double f, Py_ssize_t n)
    {
        for (Py_ssize_t j = 0; j < n; j++) y[j] = y[j] + f * x[j];
    }

    /* row[j] -= f * r[j]. */
    MM_CLONES static void mm_sub_scaled(double *restrict row, const double *restrict r, double f,
                                        Py_ssize_t n)
    {
        for (Py_ssize_t j = 0; j < n; j++) row[j] = row[j] - f * r[j];
    }

    /* sqrt(f^2 + g^2) from IEEE operations only, scaled where a square could leave the range. */
    static double mm_len2(double f, double g)
    {
        double af = fabs(f), ag = fabs(g);
        double big = af > ag ? af : ag;
        if (big == 0.0) return 0.0;
        if (big > MM_EIG_SMALL && big < MM_EIG_HUGE) return sqrt(f * f + g * g);
        double x = f / big, y = g / big;
        return big * sqrt(x * x + y * y);
    }

    /* Reduction step k's reflection from row k (final by then): d[k], e[k], tau[k]; row k
       keeps v_k in columns k+1.. with v_0 = 1 (LAPACK's convention: tau in [1, 2], and the
       norm is taken of x / max|x_i|, so neither tiny nor huge columns over- or underflow).
       Returns 0 when no reflection is needed (x_1.. all zero). */
    static int mm_reflect(double *a, Py_ssize_t ld, Py_ssize_t n, Py_ssize_t k, double *d,
                          double *e, double *tau)
    {
        Py_ssize_t m = n - k - 1;
        double *x = a + k * ld + k + 1;
        d[k] = a[k * ld + k];
        tau[k] = 0.0;
        double big = 0.0;
        for (Py_ssize_t i = 1; i < m; i++) if (fabs(x[i]) > big) big = fabs(x[i]);
        if (big == 0.0) {
            e[k] = x[0];
            return 0;
        }
        if (fabs(x[0]) > big) big = fabs(x[0]);
        double s2 = 0.0;
        for (Py_ssize_t i = 0; i < m; i++) {
            double y = x[i] / big;
            s2 = s2 + y * y;
        }
        double mu = big * sqrt(s2);
        double beta = x[0] >= 0.0 ? -mu : mu;
        double v0 = x[0] - beta;
        tau[k] = (beta - x[0]) / beta;
        for (Py_ssize_t i = 1; i < m; i++) x[i] = x[i] / v0;
        x[0] = 1.0;
        e[k] = beta;
        return 1;
    }

    /* sum_j x[j] * y[j] with eight fixed lanes (lane = j mod 8, each summed in j order,
       then ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))): vectorises, and no vector width changes it. */
    static inline __attribute__((always_inline)) double mm_dot8(const double *restrict x,
                                                                const double *restrict y, Py_ssize_t n)
    {
        double l[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        Py_ssize_t j = 0;
        for (; j + 8 <= n; j += 8)
            for (int t = 0; t < 8; t++) l[t] = l[t] + x[j + t] * y[j + t];
        for (int t = 0; j + t < n; t++) l[t] = l[t] + x[j + t] * y[j + t];
        return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }

    /* Eight doubles as one GCC vector: element-wise IEEE operations, lowered to the widest
       registers of each clone. Unaligned loads and stores by macro (a vector return value
       would change the ABI of the narrower clones). */
    typedef double mm_v8d __attribute__((vector_size(64)));
    #define MM_LD8(p) __extension__({ mm_v8d v_; memcpy(&v_, (p), sizeof v_); v_; })
    #define MM_ST8(p, v) __extension__({ mm_v8d w_ = (v); memcpy((p), &w_, sizeof w_); })

    /* One row of the symmetric product p = A v from the upper triangle: row points at the
       diagonal entry A[i][i], v and p at index i, len = entries from the diagonal on.
       p[t] += v[0] * row[t] (the row as a column), then p[0] += row[1:] . v[1:]. */
    MM_CLONES static void mm_symv_row(const double *row, const double *v, Py_ssize_t len, double *p)
    {
        mm_axpy(p, row, v[0], len);
        p[0] = p[0] + mm_dot8(row + 1, v + 1, len - 1);
    }

    /* The rank-2 update row[t] -= v_i w[t] + w_i v[t] of an upper-triangle row (pointers at
       the diagonal), then its mm_symv_row for the next step's product (vn, pn at index i).
       The dot product row[1:] . vn[1:] is accumulated while the row is updated (lane
       (t - 1) mod 8 for entry t, as mm_dot8 sums it), so its chain of additions overlaps
       the update instead of following it. */
    MM_CLONES static void mm_rank2_symv(double *restrict row, const double *restrict v,
                                        const double *restrict w, Py_ssize_t len,
                                        const double *restrict vn, double *restrict pn)
    {
        double vi = v[0], wi = w[0], f = vn[0];
        double r = row[0] - (vi * w[0] + wi * v[0]);
        row[0] = r;
        pn[0] = pn[0] + f * r;
        mm_v8d acc = {0};
        Py_ssize_t t = 1;
        for (; t + 8 <= len; t += 8) {
            mm_v8d x = MM_LD8(row + t) - (vi * MM_LD8(w + t) + wi * MM_LD8(v + t));
            MM_ST8(row + t, x);
            MM_ST8(pn + t, MM_LD8(pn + t) + f * x);
            acc = acc + x * MM_LD8(vn + t);
        }
        double l[8];
        memcpy(l, &acc, sizeof l);
        for (int q = 0; t < len; t++, q++) {
            double x = row[t] - (vi * w[t] + wi * v[t]);
            row[t] = x;
            pn[t] = pn[t] + f * x;
            l[q] = l[q] + x * vn[t];
        }
        pn[0] = pn[0] + (((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])));
    }

    /* The rank-2 update alone. */
    MM_CLONES static void mm_rank2_upper(double *restrict row, const double *restrict v,
                                         const double *restrict w, Py_ssize_t len)
    {
        double vi = v[0], wi = w[0];
        for (Py_ssize_t t = 0; t < len; t++) row[t] = row[t] - (vi * w[t] + wi * v[t]);
    }

    /* Householder reduction of symmetric a (n x n, rows ld apart; only the upper triangle is
       read and kept) to tridiagonal (d, e). Row k of a then holds v_k in columns k+1..,
       tau[k] its factor (0: no reflection). Step k: p = tau A22 v (mm_symv_row over the
       rows of A22 in order), K = tau/2 p.v, w = p - K v, A22 -= v w^T + w v^T; updating a
       row of A22 also feeds it into step k+1's product, so each step reads the trailing
       triangle once. work: 3n doubles. */
    static void mm_tridiag(double *a, Py_ssize_t ld, Py_ssize_t n, double *d, double *e,
                           double *tau, double *work)
    {
        double *p = work, *w = work + n, *pn = work + 2 * n;
        int have_p = 0;
        for (Py_ssize_t k = 0; k + 2 < n; k++) {
            Py_ssize_t m = n - k - 1;
            double *x = a + k * ld + k + 1;
            double *a22 = a + (k + 1) * ld + k + 1;
            if (!have_p) {
                if (!mm_reflect(a, ld, n, k, d, e, tau)) continue;
                for (Py_ssize_t j = 0; j < m; j++) p[j] = 0.0;
                for (Py_ssize_t i = 0; i < m; i++) mm_symv_row(a22 + i * ld + i, x + i, m - i, p + i);
            }
            double t = tau[k];
            double pv = 0.0;
            for (Py_ssize_t i = 0; i < m; i++) {
                p[i] = t * p[i];
                pv = pv + p[i] * x[i];
            }
            double kk = 0.5 * t * pv;
            for (Py_ssize_t i = 0; i < m; i++) w[i] = p[i] - kk * x[i];
            mm_rank2_upper(a22, x, w, m);
            have_p = k + 3 < n && mm_reflect(a, ld, n, k + 1, d, e, tau);
            if (have_p) {
                const double *xn = a22 + 1;
                for (Py_ssize_t j = 0; j + 1 < m; j++) pn[j] = 0.0;
                for (Py_ssize_t i = 1; i < m; i++)
                    mm_rank2_symv(a22 + i * ld + i, x + i, w + i, m - i, xn + i - 1, pn + i - 1);
                double *tmp = p;
                p = pn;
                pn = tmp;
            } else {
                for (Py_ssize_t i = 1; i < m; i++) mm_rank2_upper(a22 + i * ld + i, x + i, w + i, m - i);
                if (k + 3 < n) k++;
            }
        }
        if (n >= 2) {
            d[n - 2] = a[(n - 2) * ld + n - 2];
            e[n - 2] = a[(n - 2) * ld + n - 1];
        }
        d[n - 1] = a[(n - 1) * ld + n - 1];
        e[n - 1] = 0.0;
    }

    /* row[1 + j] -= f * r[j] for j < m, and rn[j] += g * row[j] for j <= m with the updated
       values: the next accumulation step's product, in the same pass. */
    MM_CLONES static void mm_sub_axpy(double *restrict row, const double *restrict r, double f,
                                      Py_ssize_t m, double *restrict rn, double g)
    {
        rn[0] = rn[0] + g * row[0];
        for (Py_ssize_t j = 0; j < m; j++) {
            double x = row[1 + j] - f * r[j];
            row[1 + j] = x;
            rn[1 + j] = rn[1 + j] + g * x;
        }
    }

    /* q (n x n) = H_0 .. H_{n-3} from the reflections mm_tridiag left in a, by backward
       accumulation: step k takes r = sum_i v_i Q22[i, :] (ascending), then Q22[i, :] -=
       (tau v_i) r; its row updates also accumulate step k-1's r. work: 2n doubles. */
    static void mm_tridiag_q(const double *a, Py_ssize_t ld, Py_ssize_t n, const double *tau,
                             double *q, double *work)
    {
        double *r = work, *rn = work + n;
        int have_r = 0;
        for (Py_ssize_t i = 0; i < n * n; i++) q[i] = 0.0;
        for (Py_ssize_t i = 0; i < n; i++) q[i * n + i] = 1.0;
        for (Py_ssize_t k = n - 3; k >= 0; k--) {
            if (tau[k] == 0.0) continue;
            Py_ssize_t m = n - k - 1;
            const double *v = a + k * ld + k + 1;
            double *q22 = q + (k + 1) * n + k + 1;
            if (!have_r) {
                for (Py_ssize_t j = 0; j < m; j++) r[j] = 0.0;
                for (Py_ssize_t i = 0; i < m; i++) mm_axpy(r, q22 + i * n, v[i], m);
            }
            have_r = k >= 1 && tau[k - 1] != 0.0;
            if (have_r) {
                const double *vn = a + (k - 1) * ld + k;
                for (Py_ssize_t j = 0; j <= m; j++) rn[j] = 0.0;
                mm_axpy(rn, q + k * n + k, vn[0], m + 1);
                for (Py_ssize_t i = 0; i < m; i++)
                    mm_sub_axpy(q22 + i * n - 1, r, tau[k] * v[i], m, rn, vn[i + 1]);
                double *tmp = r;
                r = rn;
                rn = tmp;
            } else {
                for (Py_ssize_t i = 0; i < m; i++) mm_sub_scaled(q22 + i * n, r, tau[k] * v[i], m);
            }
        }
    }

    /* Implicit QL on the tridiagonal (d, e; e[i] couples i and i+1, e[n-1] = 0); each
       rotation also turns rows i, i+1 of zt (n x n) unless zt is NULL. The first step for
       position l shifts by shifts[l] when shifts is given (else, and for later steps, the
       Wilkinson-type shift from d_l, d_l+1, e_l). rc, rs (n doubles each) hold one step's
       rotations until they are applied together. Returns -1 if an eigenvalue needs
       more than max_iter steps, else 0. */
    static int mm_ql(double *d, double *e, double *zt, Py_ssize_t n, int max_iter,
                     const double *shifts, double *rc, double *rs)
    {
        double tnorm = 0.0;
        for (Py_ssize_t i = 0; i < n; i++) {
            double row = fabs(d[i]) + fabs(e[i]);
            if (row > tnorm) tnorm = row;
        }
        double small = MM_EIG_SKIP * tnorm;
        for (Py_ssize_t l = 0; l < n; l++) {
            int iter = 0;
            for (;;) {
                Py_ssize_t m = l;
                for (; m + 1 < n; m++)
                    if (fabs(e[m]) <= small) break;
                if (m == l) break;
                if (++iter > max_iter) return -1;
                double g, r;
                if (shifts && iter == 1) {
                    g = d[m] - shifts[l];
                } else {
                    g = (d[l + 1] - d[l]) / (2.0 * e[l]);
                    r = mm_len2(g, 1.0);
                    g = d[m] - d[l] + e[l] / (g + (g >= 0.0 ? r : -r));
                }
                double s = 1.0, c = 1.0, p = 0.0;
                int split = 0;
                Py_ssize_t i = m - 1;
                for (; i >= l; i--) {
                    double f = s * e[i], b = c * e[i];
                    r = mm_len2(f, g);
                    e[i + 1] = r;
                    if (r == 0.0) {
                        d[i + 1] = d[i + 1] - p;
                        e[m] = 0.0;
                        split = 1;
                        break;
                    }
                    s = f / r;
                    c = g / r;
                    g = d[i + 1] - p;
                    r = (d[i] - g) * s + 2.0 * c * b;
                    p = s * r;
                    d[i + 1] = g + p;
                    g = c * r - b;
                    rc[i] = c;
                    rs[i] = s;
                }
                if (zt) mm_rot_chain(zt, n, m, i + 1, rc, rs);
                if (split) continue;
                d[l] = d[l] - p;
                e[l] = g;
                e[m] = 0.0;
            }
        }
        return 0;
    }


    /* Tridiagonalise a into (d, e) (reflections left in a and tau, n each) and put the
       tridiagonal's eigenvalues, unsorted, in vals (QL without vectors). work: 4n doubles. */
    static int mm_eigvals(double *a, Py_ssize_t ld, Py_ssize_t n, double *d, double *e, double *tau,
                          double *vals, double *work, int max_iter)
    {
        mm_tridiag(a, ld, n, d, e, tau, work);
        double *e2 = work + 3 * n;
        for (Py_ssize_t i = 0; i < n; i++) {
            vals[i] = d[i];
            e2[i] = e[i];
        }
        return mm_ql(vals, e2, NULL, n, max_iter, NULL, work, work + n);
    }

    /* The whole solver: a is overwritten; d receives the eigenvalues (unsorted), zt (n x n)
       the eigenvectors as rows. A first QL pass without vectors on a copy of the tridiagonal
       gives its eigenvalues; the pass with vectors then starts each position with that
       eigenvalue as its shift, which mostly deflates it in one step (about a quarter
       fewer rotations than the usual shifts; rotating the vectors is most of the cost).
       work: 7n doubles + n*n (q). Returns mm_ql's status. */
    static int mm_eigh(double *a, Py_ssize_t ld, Py_ssize_t n, double *d, double *zt, double *work,
                       int max_iter)
    {
        double *e = work, *tau = work + n, *shifts = work + 2 * n, *tmp = work + 3 * n;
        double *q = work + 7 * n;
        if (mm_eigvals(a, ld, n, d, e, tau, shifts, tmp, max_iter) != 0) return -1;
        mm_tridiag_q(a, ld, n, tau, q, tmp);
        for (Py_ssize_t i = 0; i < n; i++)
            for (Py_ssize_t j = 0; j < n; j++) zt[i * n + j] = q[j * n + i];
        return mm_ql(d, e, zt, n, max_iter, shifts, tmp, tmp + n);
    }


    /* x / ||x||_2 after scaling by the largest |x_j| (no overflow however large x grew). */
    static void mm_unit(double *x, Py_ssize_t n)
    {
        double big = 0.0;
        for (Py_ssize_t j = 0; j < n; j++) if (fabs(x[j]) > big) big = fabs(x[j]);
        if (big == 0.0) return;
        for (Py_ssize_t j = 0; j < n; j++) x[j] = x[j] / big;
        double inv = 1.0 / sqrt(mm_dot8(x, x, n));
        for (Py_ssize_t j = 0; j < n; j++) x[j] = x[j] * inv;
    }

    /* LU factors of T - lam I for the tridiagonal T (d, e) with partial pivoting (rows i and
       i+1 swap when |e_i| > |pivot|; piv[i] = 1), pivots smaller than tiny in magnitude
       replaced by +-tiny; f (6n doubles) receives the reciprocal pivots, the two
       superdiagonals of U, the multipliers and the swaps, in six arrays ld >= n apart.
       mm_lu_begin, then mm_lu_step for i = 0 .. n-2, then mm_lu_end. */
    static void mm_lu_begin(const double *d, const double *e, Py_ssize_t n, double lam, double *f,
                            Py_ssize_t ld)
    {
        double *dg = f, *u1 = f + ld, *u2 = f + 2 * ld;
        for (Py_ssize_t i = 0; i < n; i++) {
            dg[i] = d[i] - lam;
            u1[i] = e[i];
            u2[i] = 0.0;
        }
    }

    static inline __attribute__((always_inline)) void mm_lu_step(const double *e, Py_ssize_t n,
                                                                 Py_ssize_t i, double tiny, double *f,
                                                                 Py_ssize_t ld)
    {
        double *dg = f, *u1 = f + ld, *u2 = f + 2 * ld, *ml = f + 3 * ld, *piv = f + 4 * ld;
        double sub = e[i];
        if (fabs(dg[i]) >= fabs(sub)) {
            if (fabs(dg[i]) < tiny) dg[i] = dg[i] >= 0.0 ? tiny : -tiny;
            double fact = sub / dg[i];
            ml[i] = fact;
            piv[i] = 0.0;
            dg[i + 1] = dg[i + 1] - fact * u1[i];
        } else {
            double fact = dg[i] / sub;
            double t = u1[i];
            dg[i] = sub;
            ml[i] = fact;
            piv[i] = 1.0;
            u1[i] = dg[i + 1];
            dg[i + 1] = t - fact * dg[i + 1];
            if (i + 2 < n) {
                u2[i] = u1[i + 1];
                u1[i + 1] = -fact * u1[i + 1];
            }
        }
    }

    static void mm_lu_end(Py_ssize_t n, double tiny, double *f, Py_ssize_t ld)
    {
        double *dg = f, *rcp = f + 5 * ld;
        if (fabs(dg[n - 1]) < tiny) dg[n - 1] = dg[n - 1] >= 0.0 ? tiny : -tiny;
        for (Py_ssize_t i = 0; i < n; i++) rcp[i] = 1.0 / dg[i];
    }

    /* b := (T - lam I)^-1 b with the factors above: mm_solve_down for i = 0 .. n-2, then
       mm_solve_up for i = n-1 .. 0. */
    static inline __attribute__((always_inline)) void mm_solve_down(const double *f, Py_ssize_t ld,
                                                                    Py_ssize_t i, double *b)
    {
        const double *ml = f + 3 * ld, *piv = f + 4 * ld;
        if (piv[i] != 0.0) {
            double bi = b[i];
            b[i] = b[i + 1];
            b[i + 1] = bi - ml[i] * b[i];
        } else {
            b[i + 1] = b[i + 1] - ml[i] * b[i];
        }
    }

    static inline __attribute__((always_inline)) void mm_solve_up(const double *f, Py_ssize_t n,
                                                                  Py_ssize_t ld, Py_ssize_t i, double *b)
    {
        const double *u1 = f + ld, *u2 = f + 2 * ld, *rcp = f + 5 * ld;
        if (i == n - 1) b[i] = b[i] * rcp[i];
        else if (i == n - 2) b[i] = (b[i] - u1[i] * b[i + 1]) * rcp[i];
        else b[i] = ((b[i] - u1[i] * b[i + 1]) - u2[i] * b[i + 2]) * rcp[i];
    }

    /* Inverse iteration handles up to MM_INVIT_LANES vectors side by side when they are
       independent (no two in one cluster): the factorisation and the solves are chains of
       dependent divisions and multiplications, and interleaving independent chains keeps
       the floating-point units busy. Each vector still gets exactly the operations it
       would get alone. Its arrays are ld = n + 8 doubles apart: with n a power of two,
       n apart would put all of them in the same L1 sets. */
    #define MM_INVIT_LANES 4

    static void mm_lu_many(const double *d, const double *e, Py_ssize_t n, Py_ssize_t ld,
                           const double *shift, int cnt, double tiny, double *f)
    {
        for (int q = 0; q < cnt; q++) mm_lu_begin(d, e, n, shift[q], f + q * 6 * ld, ld);
        for (Py_ssize_t i = 0; i + 1 < n; i++)
            for (int q = 0; q < cnt; q++) mm_lu_step(e, n, i, tiny, f + q * 6 * ld, ld);
        for (int q = 0; q < cnt; q++) mm_lu_end(n, tiny, f + q * 6 * ld, ld);
    }

    static void mm_solve_many(const double *f, Py_ssize_t n, Py_ssize_t ld, int cnt, double *b)
    {
        for (Py_ssize_t i = 0; i + 1 < n; i++)
            for (int q = 0; q < cnt; q++) mm_solve_down(f + q * 6 * ld, ld, i, b + q * ld);
        for (Py_ssize_t i = n - 1; i >= 0; i--)
            for (int q = 0; q < cnt; q++) mm_solve_up(f + q * 6 * ld, n, ld, i, b + q * ld);
    }

    /* The reflections on 8 nv columns of x (nv = 1 .. 4 vectors of eight; rows 8 nv apart):
       for s = n-3 .. 0, r = sum_i v_i x[s+1+i, :] (rows ascending), then x[s+1+i, :] -=
       (tau_s v_i) r, whose row updates also accumulate step s-1's r (same operations, one
       pass over the rows instead of two). Columns are independent, so one block runs every
       step with r and the next r in registers (nv independent chains) and its rows in
       L1/L2. nv is a constant at each call, so the loops over it unroll. */
    static inline __attribute__((always_inline)) void mm_back_block(const double *a, Py_ssize_t ld,
                                                                    Py_ssize_t n, const double *tau,
                                                                    double *x, const int nv)
    {
        const Py_ssize_t w = 8 * nv;
        mm_v8d zero = {0}, r[4] = {zero, zero, zero, zero}, rn[4];
        int have_r = 0;
        for (Py_ssize_t s = n - 3; s >= 0; s--) {
            if (tau[s] == 0.0) continue;
            Py_ssize_t m = n - s - 1;
            const double *v = a + s * ld + s + 1;
            double *xs = x + (s + 1) * w;
            if (!have_r) {
                for (int q = 0; q < nv; q++) r[q] = zero;
                for (Py_ssize_t i = 0; i < m; i++)
                    for (int q = 0; q < nv; q++) r[q] = r[q] + v[i] * MM_LD8(xs + i * w + 8 * q);
            }
            have_r = s >= 1 && tau[s - 1] != 0.0;
            if (have_r) {
                const double *vn = a + (s - 1) * ld + s, *top = x + s * w;
                for (int q = 0; q < nv; q++) rn[q] = zero + vn[0] * MM_LD8(top + 8 * q);
                for (Py_ssize_t i = 0; i < m; i++) {
                    double *row = xs + i * w, f = tau[s] * v[i], g = vn[i + 1];
                    for (int q = 0; q < nv; q++) {
                        mm_v8d y = MM_LD8(row + 8 * q) - f * r[q];
                        MM_ST8(row + 8 * q, y);
                        rn[q] = rn[q] + g * y;
                    }
                }
                for (int q = 0; q < nv; q++) r[q] = rn[q];
            } else {
                for (Py_ssize_t i = 0; i < m; i++) {
                    double *row = xs + i * w, f = tau[s] * v[i];
                    for (int q = 0; q < nv; q++) MM_ST8(row + 8 * q, MM_LD8(row + 8 * q) - f * r[q]);
                }
            }
        }
    }

    /* Columns j0 .. j0+w-1 (w <= 32) of x (n x k) := H_0 .. H_{n-3} applied to the vectors
       in rows j0 .. of vs (n apart): the group is copied into buf (n rows of the next
       multiple of 8 >= w, zero-padded, contiguous, so its rows fill consecutive cache lines
       whatever k is; the zero columns stay zero and change no other column), reflected and
       copied out, each vector negated if its largest-magnitude component (the first on
       ties) is negative (eigh's sign rule). */
    MM_CLONES static void mm_reflect_group(const double *a, Py_ssize_t ld, Py_ssize_t n,
                                           const double *tau, Py_ssize_t k, const double *vs,
                                           double *x, Py_ssize_t j0, int w, double *buf)
    {
        int nv = (w + 7) / 8, wp = 8 * nv;
        for (Py_ssize_t i = 0; i < n; i++)
            for (int j = 0; j < wp; j++) buf[i * wp + j] = j < w ? vs[(j0 + j) * n + i] : 0.0;
        switch (nv) {
        case 1: mm_back_block(a, ld, n, tau, buf, 1); break;
        case 2: mm_back_block(a, ld, n, tau, buf, 2); break;
        case 3: mm_back_block(a, ld, n, tau, buf, 3); break;
        default: mm_back_block(a, ld, n, tau, buf, 4); break;
        }
        int flip[32];
        for (int j = 0; j < w; j++) {
            double big = -1.0, lead = 0.0;
            for (Py_ssize_t i = 0; i < n; i++) {
                double v = buf[i * wp + j];
                if (fabs(v) > big) {
                    big = fabs(v);
                    lead = v;
                }
            }
            flip[j] = lead < 0.0;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            for (int j = 0; j < w; j++) {
                double v = buf[i * wp + j];
                x[i * k + j0 + j] = flip[j] ? -v : v;
            }
    }

    /* x (n x k) := H_0 .. H_{n-3} V^T for the k vectors in the rows of vs: groups of 32
       vectors are independent, so they are handed out to up to nt threads (each with its
       own 32 n doubles of buf); no result depends on which thread takes which group. */
    static void mm_reflect_back(const double *a, Py_ssize_t ld, Py_ssize_t n, const double *tau,
                                Py_ssize_t k, const double *vs, double *x, double *buf, int nt)
    {
        Py_ssize_t groups = (k + 31) / 32;
        if (nt > groups) nt = (int)groups;
        MM_PAR_BLOCKS(groups, 1, nt, {
            (void)hi;
            Py_ssize_t j0 = lo * 32;
            int w = k - j0 < 32 ? (int)(k - j0) : 32;
            mm_reflect_group(a, ld, n, tau, k, vs, x, j0, w, buf + (size_t)tid * 32 * n);
        });
    }

    /* Unit eigenvectors of the tridiagonal (d, e) for the eigenvalues lam[0..k-1] (descending)
       by inverse iteration, then taken back through the reflections in a (from mm_tridiag)
       into x (n x k, vectors as columns). Eigenvalues closer than 1e-3 ||T|| to the previous
       one form a cluster: shifts in a cluster are kept at least 10 eps ||T|| apart, and each
       vector is orthogonalised (modified Gram-Schmidt, in order) against the earlier ones of
       its cluster after every solve (twice, normalising after each pass: one pass loses
       orthogonality when the solve leaves little outside the earlier vectors' span). Start vector: the fixed sequence 1, -1/2, 1/3, -1/4, ...
       shifted by the vector's index; MM_INVIT_STEPS = 2 solves each (the first from a
       shift accurate to eps ||T|| already leaves a residual near eps ||T||; the second guards
       against a start vector nearly orthogonal to the eigenvector). Consecutive vectors
       that each start a cluster (after the first of the group) run MM_INVIT_LANES at a time.
       work: 7 MM_INVIT_LANES (n + 8) + k n + 32 n want doubles. */
    #define MM_INVIT_STEPS 2
    #define MM_INVIT_RESID 16.0
    static int mm_top_vectors(const double *a, Py_ssize_t ld, Py_ssize_t n, const double *d,
                              const double *e, const double *tau, const double *lam, Py_ssize_t k, double *x,
                              double *work, int want, Py_ssize_t grain)
    {
        int nt = mm_team(want, n * n * k, grain);
        double tnorm = 0.0;
        for (Py_ssize_t i = 0; i < n; i++) {
            double row = fabs(d[i]) + fabs(e[i]) + (i > 0 ? fabs(e[i - 1]) : 0.0);
            if (row > tnorm) tnorm = row;
        }
        if (tnorm == 0.0) tnorm = 1.0;
        double tiny = MM_EIG_SKIP * tnorm, gap = 1e-3 * tnorm, sep = 10.0 * MM_EIG_SKIP * tnorm;
        Py_ssize_t fl = n + 8;
        double *b = work, *f = work + MM_INVIT_LANES * fl;
        double *vs = work + 7 * MM_INVIT_LANES * fl, *buf = vs + k * n;
        Py_ssize_t first = 0;
        double shift = 0.0, shifts[MM_INVIT_LANES];
        for (Py_ssize_t j = 0; j < k;) {
            int cnt = 0;
            Py_ssize_t first_j = 0;
            do {
                Py_ssize_t t = j + cnt;
                if (t == 0 || lam[t - 1] - lam[t] > gap) {
                    first = t;
                    shift = lam[t];
                } else {
                    shift = lam[t] < shift - sep ? lam[t] : shift - sep;
                }
                if (cnt == 0) first_j = first;  /* vector j may continue an earlier cluster */
                shifts[cnt++] = shift;
            } while (cnt < MM_INVIT_LANES && j + cnt < k && lam[j + cnt - 1] - lam[j + cnt] > gap);
            for (int q = 0; q < cnt; q++) {
                double *v = vs + (j + q) * n;
                for (Py_ssize_t i = 0; i < n; i++) {
                    Py_ssize_t t = i + j + q;
                    v[i] = (t % 2 ? -1.0 : 1.0) / (double)(t % n + 1);
                }
            }
            mm_lu_many(d, e, n, fl, shifts, cnt, tiny, f);
            for (int step = 0; step < MM_INVIT_STEPS; step++) {
                for (int q = 0; q < cnt; q++)
                    for (Py_ssize_t i = 0; i < n; i++) b[q * fl + i] = vs[(j + q) * n + i];
                mm_solve_many(f, n, fl, cnt, b);
                for (int q = 0; q < cnt; q++) {
                    double *bq = b + q * fl;
                    mm_unit(bq, n);
                    for (int pass = 0; pass < 2 && q == 0 && first_j < j; pass++) {
                        for (Py_ssize_t c = first_j; c < j; c++) {
                            double h = mm_dot8(vs + c * n, bq, n);
                            for (Py_ssize_t i = 0; i < n; i++) bq[i] = bq[i] - h * vs[c * n + i];
                        }
                        mm_unit(bq, n);
                    }
                    for (Py_ssize_t i = 0; i < n; i++) vs[(j + q) * n + i] = bq[i];
                }
            }
            j += cnt;
        }
        /* Every vector must be an eigenvector of T to within MM_INVIT_RESID n eps ||T||;
           otherwise (extremely graded matrices, where replaced pivots hide eigenvalues far
           below eps ||T||) the caller falls back to QL. */
        double limit = MM_INVIT_RESID * (double)n * MM_EIG_SKIP * tnorm;
        for (Py_ssize_t j = 0; j < k; j++) {
            const double *v = vs + j * n;
            for (Py_ssize_t i = 0; i < n; i++) {
                double t = d[i] * v[i] - lam[j] * v[i];
                if (i > 0) t = t + e[i - 1] * v[i - 1];
                if (i + 1 < n) t = t + e[i] * v[i + 1];
                if (!(fabs(t) <= limit)) return 1;
            }
        }
        mm_reflect_back(a, ld, n, tau, k, vs, x, buf, nt);
        return 0;
    }

    """
    int mm_eigh(double *a, Py_ssize_t ld, Py_ssize_t n, double *d, double *zt, double *work, int max_iter) nogil
    int mm_eigvals(double *a, Py_ssize_t ld, Py_ssize_t n, double *d, double *e, double *tau, double *vals,
                   double *work, int max_iter) nogil
    int mm_top_vectors(const double *a, Py_ssize_t ld, Py_ssize_t n, const double *d, const double *e,
                       const double *tau, const double *lam, Py_ssize_t k, double *x, double *work,
                       int want, Py_ssize_t grain) nogil
    enum: MM_INVIT_LANES

#: QL steps allowed for one eigenvalue (exceeding it raises; part of the definition).
MAX_ITERATIONS = 60


def _square_f64(a, what):
    arr = np.asarray(a)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {arr.shape}")
    if arr.dtype != np.float64:
        raise ValueError(f"{what} must be float64, got {arr.dtype}")
    return arr


def _scaled(a):
    """The validated matrix times the power of two that puts max |a_ij| in [1, 2), and that power."""
    arr = _square_f64(a, "matrix")
    if not np.all(np.isfinite(arr)):
        raise ValueError("matrix holds NaN or Inf")
    if not np.array_equal(arr, arr.T):
        raise ValueError("matrix is not exactly symmetric")
    amax = float(np.max(np.abs(arr))) if arr.size else 0.0
    shift = 1 - math.frexp(amax)[1] if amax > 0.0 else 0
    return np.ascontiguousarray(np.ldexp(arr, shift)), shift


def _positive_lead(rows):
    """Flip each row so its largest-magnitude component (the first on ties) is positive."""
    if rows.size:
        lead = np.argmax(np.abs(rows), axis=1)
        flip = rows[np.arange(rows.shape[0]), lead] < 0.0
        rows[flip] = -rows[flip]
    return rows


def _no_convergence():
    return ValueError(f"eigensolver: the QL iteration did not converge in {MAX_ITERATIONS} steps")


def eigh(a):
    """Eigen-decomposition of a symmetric float64 matrix: ``(values, vectors)``.

    ``values`` ascending (ties in diagonal order of the tridiagonal form),
    ``vectors[:, i]`` the unit eigenvector of ``values[i]`` with its
    largest-magnitude component positive. Raises ValueError for a non-square,
    non-symmetric or non-finite matrix, or if the QL iteration does not converge.
    """
    work_a, shift = _scaled(a)
    n = work_a.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros((0, 0))
    diag = np.zeros(n, dtype=np.float64)
    zt = np.zeros((n, n), dtype=np.float64)
    scratch = np.zeros(7 * n + n * n, dtype=np.float64)
    cdef double[:, ::1] av = work_a
    cdef double[::1] dv = diag
    cdef double[:, ::1] zv = zt
    cdef double[::1] sv = scratch
    cdef Py_ssize_t nn = n, ld = work_a.shape[1]
    cdef int cap = MAX_ITERATIONS, status
    with nogil:
        status = mm_eigh(&av[0, 0], ld, nn, &dv[0], &zv[0, 0], &sv[0], cap)
    if status != 0:
        raise _no_convergence()
    order = np.argsort(diag, kind="stable")
    return np.ldexp(diag[order], -shift), np.ascontiguousarray(_positive_lead(zt[order]).T)


def eigh_top(a, choose, complement=False, *, int threads=0):
    """All eigenvalues of a symmetric float64 matrix, largest first, and the unit
    eigenvectors (columns, same order) of the ``k = choose(values)`` largest.

    For rank truncations, which need only the leading vectors: the values come from
    QL without vectors, the k vectors from inverse iteration on the tridiagonal form,
    taken back through the reflections (about ``n^2 k`` flops instead of QL's ``~6 n^3``
    on the vectors; see ``mm_top_vectors`` for the exact procedure). With
    ``complement`` and ``k > n - k`` it returns instead the ``n - k`` trailing
    eigenvectors (smallest eigenvalue first), the cheaper side of the split: the
    projection onto the leading k is then ``I - U U^T``; a caller tells which side it
    got from the column count (trailing only when ``n - k < k``). Ties among the
    values keep their order on the tridiagonal; the sign rule is :func:`eigh`'s. A
    cluster of eigenvalues cut by k gets an arbitrary (but deterministic) orthonormal
    basis of the part kept, as any eigensolver would. Errors as :func:`eigh`, plus a
    ValueError if ``choose`` returns anything but an int in ``0..n``. ``threads`` caps the
    threads taking the vectors back through the reflections (0: the kernel default), as
    for :func:`meshmerge.cext.gemm.matmul`; the result does not depend on it.
    """
    work_a, shift = _scaled(a)
    n = work_a.shape[0]
    diag = np.zeros(n, dtype=np.float64)
    off = np.zeros(n, dtype=np.float64)
    tau = np.zeros(n, dtype=np.float64)
    vals = np.zeros(n, dtype=np.float64)
    scratch = np.zeros(max(7 * n, 1), dtype=np.float64)
    cdef double[:, ::1] av = work_a
    cdef double[::1] dv = diag, ev = off, tv = tau, vv = vals, sv = scratch
    cdef Py_ssize_t nn = n, ld = work_a.shape[1], cnt
    cdef int cap = MAX_ITERATIONS, status = 0
    if n > 0:
        with nogil:
            status = mm_eigvals(&av[0, 0], ld, nn, &dv[0], &ev[0], &tv[0], &vv[0], &sv[0], cap)
    if status != 0:
        raise _no_convergence()
    order = np.argsort(-vals, kind="stable")
    scaled_desc = np.ascontiguousarray(vals[order])
    values = np.ldexp(scaled_desc, -shift)
    k = choose(values.copy())
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k <= n:
        raise ValueError(f"eigh_top: choose() must return an int in 0..{n}, got {k!r}")
    if complement and n - k < k:
        # The trailing vectors are the leading ones of -T: same code, same reflections.
        cnt = n - k
        lam = np.ascontiguousarray(-scaled_desc[k:][::-1])
        diag, off = -diag, -off
    else:
        cnt = k
        lam = scaled_desc
    if cnt == 0:
        return values, np.zeros((n, 0), dtype=np.float64)
    cdef int want = threads if threads > 0 else get_threads()
    cdef Py_ssize_t grain = get_grain()
    x = np.empty((n, cnt), dtype=np.float64)
    work = np.empty(7 * MM_INVIT_LANES * (n + 8) + cnt * n + 32 * n * want, dtype=np.float64)
    cdef double[:, ::1] xv = x
    cdef double[::1] wv = work, lv = lam, dv2 = diag, ev2 = off
    cdef int bad
    with nogil:
        bad = mm_top_vectors(&av[0, 0], ld, nn, &dv2[0], &ev2[0], &tv[0], &lv[0], cnt, &xv[0, 0], &wv[0],
                             want, grain)
    if bad:
        # Inverse iteration missed its residual bound: the same vectors from the QL solver.
        _, full = eigh(a)
        x = np.ascontiguousarray(full[:, :cnt] if cnt != k else full[:, ::-1][:, :cnt])
        return values, x
    return values, x

