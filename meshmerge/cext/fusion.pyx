# cython: language_level=3
"""Row statistics for Arcee Fusion: softmax KL divergence between model and base rows.

For each row (the last axis) of a model tensor ``x`` and its base ``b``:
``p = softmax(x) + 1e-8``, ``q = softmax(b) + 1e-8`` and
``kl = sum_i p_i log(p_i / q_i)``, all in float64.

Determinism: ``exp`` and ``log`` are our own (``mm_detmath.h``: IEEE
``+ - * /`` and exact scaling by powers of two only, no libm), so every CPU
gets the same bits.
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
    #include "mm_detmath.h"

    #define MM_FU_BLOCK 4096
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
                s = s + p * mm_det_log(p / q);
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

