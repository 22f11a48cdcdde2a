# cython: language_level=3
"""Kernels for merges that treat an element by how many contributors changed it (RAM).

An entry of task vector ``t_k`` (``x_k - b``, or ``x_k`` for deltas, float64)
*contributes* when ``|t_k| > eps``. Per element, ``count`` contributors:
0 gives the base, 1 gives that contributor's ``lam_k * t_k``, more give the
weighted mean ``sum w_k t_k / sum w_k`` over the contributing entries (k = 0..N-1
in order, float64), and the output is ``float32(b + m)``. Counts are integers,
so the per-contributor tallies do not depend on the thread split; every
float64 operation per element runs in a fixed order, so neither does any byte.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport calloc, free, malloc

from meshmerge.cext._common cimport first_nonfinite, gather_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()


cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"

    /* Elements per block: the per-element accumulators (a few KiB each) stay in
       L1 while the N contributions stream through once per sweep. */
    #define MM_OV_BLOCK 2048
    #define MM_OV_STREAM_MIN ((Py_ssize_t)1 << 20)
    #define MM_OV_T(x, j) (has_base ? (double)(x)[j] - (double)bl[j] : (double)(x)[j])
    /* bit 31 of the result is set iff the float32 x is NaN or Inf */
    #define MM_OV_BAD(x) ({ uint32_t bits_; memcpy(&bits_, &(x), 4); (bits_ & 0x7F800000u) + 0x00800000u; })

    /* Contributor counts of one block into cnt[0..m). flags[k] |= NaN/Inf bits of x_k. */
    static inline __attribute__((always_inline)) void mm_ov_count(
        const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t start, Py_ssize_t m, double eps,
        int32_t *restrict cnt, uint32_t *flags, const int has_base)
    {
        const float *bl = has_base ? b + start : NULL;
        for (Py_ssize_t j = 0; j < m; j++) cnt[j] = 0;
        for (Py_ssize_t k = 0; k < nk; k++) {
            const float *x = xs[k] + start;
            uint32_t f = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                cnt[j] += fabs(MM_OV_T(x, j)) > eps;
                f |= MM_OV_BAD(x[j]);
            }
            flags[k] |= f;
        }
    }

    /* Per contributor k, how many of its contributing entries are shared (count > 1)
       and how many are its alone (count == 1), over [lo0, hi0). */
    MM_CLONES static void mm_overlap_counts(const float *const *xs, const float *b, Py_ssize_t nk,
                                            Py_ssize_t lo0, Py_ssize_t hi0, double eps, int64_t *shared,
                                            int64_t *unique, uint32_t *flags)
    {
        int32_t cnt[MM_OV_BLOCK];
        for (Py_ssize_t start = lo0; start < hi0; start += MM_OV_BLOCK) {
            Py_ssize_t m = hi0 - start < MM_OV_BLOCK ? hi0 - start : MM_OV_BLOCK;
            if (b != NULL) mm_ov_count(xs, b, nk, start, m, eps, cnt, flags, 1);
            else mm_ov_count(xs, b, nk, start, m, eps, cnt, flags, 0);
            const float *bl = b != NULL ? b + start : NULL;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + start;
                int64_t sh = 0, un = 0;
                if (bl != NULL) {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        int nz = fabs((double)x[j] - (double)bl[j]) > eps;
                        sh += nz & (cnt[j] > 1);
                        un += nz & (cnt[j] == 1);
                    }
                } else {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        int nz = fabs((double)x[j]) > eps;
                        sh += nz & (cnt[j] > 1);
                        un += nz & (cnt[j] == 1);
                    }
                }
                shared[k] += sh;
                unique[k] += un;
            }
        }
    }

    static inline __attribute__((always_inline)) void mm_ov_merge_block(
        const float *const *xs, const float *b, const double *w, const double *lam, Py_ssize_t nk,
        Py_ssize_t start, Py_ssize_t m, double eps, int32_t *restrict cnt, double *restrict num,
        double *restrict den, double *restrict uval, float *restrict row, uint32_t *flags, const int has_base)
    {
        const float *bl = has_base ? b + start : NULL;
        for (Py_ssize_t j = 0; j < m; j++) { cnt[j] = 0; num[j] = 0.0; den[j] = 0.0; uval[j] = 0.0; }
        for (Py_ssize_t k = 0; k < nk; k++) {
            const float *x = xs[k] + start;
            const double wk = w[k], lk = lam[k];
            uint32_t f = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                double t = MM_OV_T(x, j);
                int nz = fabs(t) > eps;
                cnt[j] += nz;
                num[j] = num[j] + (nz ? wk * t : 0.0);
                den[j] = den[j] + (nz ? wk : 0.0);
                uval[j] = uval[j] + (nz ? lk * t : 0.0);
                f |= MM_OV_BAD(x[j]);
            }
            flags[k] |= f;
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            double mean = cnt[j] > 1 ? num[j] / den[j] : 0.0;
            double v = cnt[j] == 1 ? uval[j] : mean;
            row[j] = has_base ? (float)((double)bl[j] + v) : (float)(0.0 + v);
        }
    }
    #undef MM_OV_T

    MM_CLONES static void mm_overlap_merge(const float *const *xs, const float *b, const double *w,
                                           const double *lam, Py_ssize_t nk, Py_ssize_t lo0, Py_ssize_t hi0,
                                           double eps, float *out, uint32_t *flags, int stream)
    {
        int32_t cnt[MM_OV_BLOCK];
        double num[MM_OV_BLOCK], den[MM_OV_BLOCK], uval[MM_OV_BLOCK];
        float row[MM_OV_BLOCK];
        for (Py_ssize_t start = lo0; start < hi0; start += MM_OV_BLOCK) {
            Py_ssize_t m = hi0 - start < MM_OV_BLOCK ? hi0 - start : MM_OV_BLOCK;
            if (b != NULL) mm_ov_merge_block(xs, b, w, lam, nk, start, m, eps, cnt, num, den, uval, row, flags, 1);
            else mm_ov_merge_block(xs, b, w, lam, nk, start, m, eps, cnt, num, den, uval, row, flags, 0);
            mm_put_f32(out + start, row, m, stream);
        }
    #if defined(__x86_64__)
        if (stream) _mm_sfence();
    #endif
    }

    static void mm_overlap_counts_par(const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t n,
                                      double eps, int64_t *tshared, int64_t *tunique, uint32_t *tflags, int nt,
                                      Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            Py_ssize_t o = (Py_ssize_t)tid * nk;
            mm_overlap_counts(xs, b, nk, lo, hi, eps, tshared + o, tunique + o, tflags + o);
        });
    }

    static void mm_overlap_merge_par(const float *const *xs, const float *b, const double *w,
                                     const double *lam, Py_ssize_t nk, Py_ssize_t n, double eps, float *out,
                                     uint32_t *tflags, int nt, Py_ssize_t grain)
    {
        int stream = n >= MM_OV_STREAM_MIN;
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_overlap_merge(xs, b, w, lam, nk, lo, hi, eps, out, tflags + (Py_ssize_t)tid * nk, stream);
        });
    }
    """
    void mm_overlap_counts_par(const float** xs, const float* b, Py_ssize_t nk, Py_ssize_t n, double eps,
                               int64_t* tshared, int64_t* tunique, uint32_t* tflags, int nt,
                               Py_ssize_t grain) nogil
    void mm_overlap_merge_par(const float** xs, const float* b, const double* w, const double* lam,
                              Py_ssize_t nk, Py_ssize_t n, double eps, float* out, uint32_t* tflags, int nt,
                              Py_ssize_t grain) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil


def overlap_counts(list xs, object base, double eps, int64_t[::1] shared, int64_t[::1] unique,
                   int threads=0):
    """Add each contributor's shared and sole contributing entries of this chunk to
    ``shared[k]`` / ``unique[k]``. Returns the first k whose chunk holds NaN or Inf, or -1."""
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        raise ValueError("no inputs")
    if shared.shape[0] != nk or unique.shape[0] != nk:
        raise ValueError("shared and unique need one slot per input")
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef Py_ssize_t k, t
    cdef const float** p = <const float**>malloc(nk * sizeof(float*))
    cdef int64_t* tsh = <int64_t*>calloc(nk * nt, sizeof(int64_t))
    cdef int64_t* tun = <int64_t*>calloc(nk * nt, sizeof(int64_t))
    cdef uint32_t* tflags = <uint32_t*>calloc(nk * nt, sizeof(uint32_t))
    cdef const float* b
    try:
        if p == NULL or tsh == NULL or tun == NULL or tflags == NULL:
            raise MemoryError()
        gather_f32(xs, n, p)
        b = optional_f32(base, n)
        if n == 0:
            return -1
        with nogil:
            mm_overlap_counts_par(p, b, nk, n, eps, tsh, tun, tflags, nt, grain)
        for k in range(nk):
            for t in range(nt):
                shared[k] += tsh[t * nk + k]
                unique[k] += tun[t * nk + k]
        return first_nonfinite(tflags, nk, nt)
    finally:
        free(p); free(tsh); free(tun); free(tflags)


def overlap_merge(list xs, object base, const double[::1] weights, const double[::1] lam, double eps,
                  float[::1] out, int threads=0):
    """RAM combination of one chunk into ``out`` (see the module docstring).

    Returns the first k whose chunk holds NaN or Inf (the output is then
    meaningless), or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t n = out.shape[0]
    if nk == 0:
        raise ValueError("no inputs")
    if weights.shape[0] != nk or lam.shape[0] != nk:
        raise ValueError("weights and lam need one value per input")
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef const float** p = <const float**>malloc(nk * sizeof(float*))
    cdef uint32_t* tflags = <uint32_t*>calloc(nk * nt, sizeof(uint32_t))
    cdef const float* b
    try:
        if p == NULL or tflags == NULL:
            raise MemoryError()
        gather_f32(xs, n, p)
        b = optional_f32(base, n)
        if n == 0:
            return -1
        with nogil:
            mm_overlap_merge_par(p, b, &weights[0], &lam[0], nk, n, eps, &out[0], tflags, nt, grain)
        return first_nonfinite(tflags, nk, nt)
    finally:
        free(p); free(tflags)
