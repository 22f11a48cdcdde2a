# cython: language_level=3
"""Row statistics for Arcee Fusion: softmax KL divergence between model and base rows.

For each row (the last axis) of a model tensor ``x`` and its base ``b``:
``p = softmax(x) + 1e-8``, ``q = softmax(b) + 1e-8`` and
``kl = sum_i p_i log(p_i / q_i)``, all in float64.

Determinism: ``exp`` and ``log`` are our own (IEEE ``+ - * /`` and exact
scaling by powers of two only, no libm), so every CPU gets the same bits.
Sums over a row run in blocks of ``FUSION_BLOCK`` elements (each block's sum
in index order, then the blocks' sums in block order); threads take whole
blocks, so neither the thread count nor the chunking changes a result.
Accuracy: ``exp`` and ``log`` are within a few ulp of the true values.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t

from meshmerge.cext.threads import get_threads

cnp.import_array()


cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #include "mm_par.h"

    #define MM_FU_BLOCK 4096
    #define MM_LN2_HI 6.93147180369123816490e-01  /* ln 2 with 21 trailing zero bits */
    #define MM_LN2_LO 1.90821492927058770002e-10  /* ln 2 - MM_LN2_HI */
    #define MM_INV_LN2 1.44269504088896338700e+00

    /* 2^k as a double for -1022 <= k <= 1023 (exact: built from its bits). */
    static inline double mm_pow2(int k)
    {
        uint64_t bits = (uint64_t)(k + 1023) << 52;
        double d;
        memcpy(&d, &bits, 8);
        return d;
    }

    /* e^x for x <= 0: x = k ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part ln 2),
       e^r by its Taylor series to r^14/14! (Horner), times 2^k in at most two exact
       power-of-two scalings (the second rounds once, in the subnormal range). */
    static inline double mm_exp_nonpos(double x)
    {
        if (x != x) return x;
        if (x < -746.0) return 0.0;
        double kd = floor(x * MM_INV_LN2 + 0.5);
        int k = (int)kd;
        double r = (x - kd * MM_LN2_HI) - kd * MM_LN2_LO;
        double p = 1.0 / 87178291200.0;            /* 1/14! */
        p = p * r + 1.0 / 6227020800.0;            /* 1/13! */
        p = p * r + 1.0 / 479001600.0;
        p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0;
        p = p * r + 1.0 / 362880.0;
        p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        if (k >= -1022) return p * mm_pow2(k);
        return (p * mm_pow2(k + 1022)) * mm_pow2(-1022);
    }

    /* log y for finite y > 0: y = m 2^e with m in [sqrt(1/2), sqrt(2)) (exact, frexp),
       log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172, by 17 series terms. */
    static inline double mm_log_pos(double y)
    {
        int e;
        double m = frexp(y, &e);
        if (m < 0.70710678118654752440) { m = m * 2.0; e = e - 1; }
        double s = (m - 1.0) / (m + 1.0), s2 = s * s;
        double t = 1.0 / 33.0;
        for (int j = 31; j >= 1; j -= 2) t = t * s2 + 1.0 / (double)j;
        double ed = (double)e;
        return ed * MM_LN2_HI + (ed * MM_LN2_LO + 2.0 * s * t);
    }

    /* Block g of rows of length c (blocks never cross a row): the sums of
       exp(x - mx[row]) and exp(b - mb[row]) over its elements, in index order. */
    static void mm_fusion_expsums(const float *x, const float *b, const float *mx, const float *mb,
                                  Py_ssize_t rows, Py_ssize_t c, double *sx, double *sb, int nt)
    {
        const Py_ssize_t per = (c + MM_FU_BLOCK - 1) / MM_FU_BLOCK, nb = rows * per;
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)
        for (Py_ssize_t g = 0; g < nb; g++) {
            const Py_ssize_t row = g / per, lo = (g % per) * MM_FU_BLOCK;
            const Py_ssize_t hi = lo + MM_FU_BLOCK < c ? lo + MM_FU_BLOCK : c;
            const float *xr = x + row * c, *br = b + row * c;
            const double ax = (double)mx[row], ab = (double)mb[row];
            double s1 = 0.0, s2 = 0.0;
            for (Py_ssize_t i = lo; i < hi; i++) {
                s1 = s1 + mm_exp_nonpos((double)xr[i] - ax);
                s2 = s2 + mm_exp_nonpos((double)br[i] - ab);
            }
            sx[g] = s1;
            sb[g] = s2;
        }
    }

    /* Block g's sum of p log(p / q) with p = exp(x - mx) / zx + 1e-8, q likewise. */
    static void mm_fusion_kl(const float *x, const float *b, const float *mx, const float *mb,
                             const double *zx, const double *zb, Py_ssize_t rows, Py_ssize_t c,
                             double *kl, int nt)
    {
        const Py_ssize_t per = (c + MM_FU_BLOCK - 1) / MM_FU_BLOCK, nb = rows * per;
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)
        for (Py_ssize_t g = 0; g < nb; g++) {
            const Py_ssize_t row = g / per, lo = (g % per) * MM_FU_BLOCK;
            const Py_ssize_t hi = lo + MM_FU_BLOCK < c ? lo + MM_FU_BLOCK : c;
            const float *xr = x + row * c, *br = b + row * c;
            const double ax = (double)mx[row], ab = (double)mb[row], ux = zx[row], ub = zb[row];
            double s = 0.0;
            for (Py_ssize_t i = lo; i < hi; i++) {
                double p = mm_exp_nonpos((double)xr[i] - ax) / ux + 1e-8;
                double q = mm_exp_nonpos((double)br[i] - ab) / ub + 1e-8;
                s = s + p * mm_log_pos(p / q);
            }
            kl[g] = s;
        }
    }
    """
    void mm_fusion_expsums(const float* x, const float* b, const float* mx, const float* mb,
                           Py_ssize_t rows, Py_ssize_t c, double* sx, double* sb, int nt) nogil
    void mm_fusion_kl(const float* x, const float* b, const float* mx, const float* mb, const double* zx,
                      const double* zb, Py_ssize_t rows, Py_ssize_t c, double* kl, int nt) nogil
    double mm_exp_nonpos(double x) nogil
    double mm_log_pos(double y) nogil

cdef enum:
    MM_FU_BLOCK_ = 4096

#: Elements per partial sum of a row.
FUSION_BLOCK = 4096


def _row_sums(const double[::1] parts, Py_ssize_t rows, Py_ssize_t per):
    """Each row's block sums added in block order."""
    out = np.empty(rows, dtype=np.float64)
    cdef double[::1] o = out
    cdef Py_ssize_t r, g
    cdef double s
    for r in range(rows):
        s = 0.0
        for g in range(per):
            s = s + parts[r * per + g]
        o[r] = s
    return out


def softmax_kl_rows(const float[:, ::1] x, const float[:, ::1] b, int threads=0):
    """``kl[row] = sum_i p_i log(p_i / q_i)``, ``p = softmax(x[row]) + 1e-8``,
    ``q = softmax(b[row]) + 1e-8`` (float64). Inputs must be finite."""
    cdef Py_ssize_t rows = x.shape[0], c = x.shape[1]
    if b.shape[0] != rows or b.shape[1] != c:
        raise ValueError("x and b must have the same shape")
    if rows == 0 or c == 0:
        return np.zeros(rows, dtype=np.float64)
    cdef int nt = max(1, threads if threads > 0 else get_threads())
    cdef Py_ssize_t per = (c + MM_FU_BLOCK_ - 1) // MM_FU_BLOCK_
    xa = np.asarray(x)
    ba = np.asarray(b)
    mx = np.ascontiguousarray(xa.max(axis=1))
    mb = np.ascontiguousarray(ba.max(axis=1))
    cdef const float[::1] mxv = mx
    cdef const float[::1] mbv = mb
    sx = np.empty(rows * per, dtype=np.float64)
    sb = np.empty(rows * per, dtype=np.float64)
    cdef double[::1] sxv = sx
    cdef double[::1] sbv = sb
    with nogil:
        mm_fusion_expsums(&x[0, 0], &b[0, 0], &mxv[0], &mbv[0], rows, c, &sxv[0], &sbv[0], nt)
    zx = _row_sums(sx, rows, per)
    zb = _row_sums(sb, rows, per)
    cdef const double[::1] zxv = zx
    cdef const double[::1] zbv = zb
    with nogil:
        mm_fusion_kl(&x[0, 0], &b[0, 0], &mxv[0], &mbv[0], &zxv[0], &zbv[0], rows, c, &sxv[0], nt)
    return _row_sums(sx, rows, per)


def det_exp(double x):
    """Our ``e^x`` for ``x <= 0`` (for tests)."""
    if x > 0.0:
        raise ValueError("det_exp is defined for x <= 0")
    return mm_exp_nonpos(x)


def det_log(double y):
    """Our natural log for finite ``y > 0`` (for tests)."""
    if not (y > 0.0) or y == float("inf"):
        raise ValueError("det_log is defined for finite y > 0")
    return mm_log_pos(y)
