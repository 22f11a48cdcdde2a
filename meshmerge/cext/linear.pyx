# cython: language_level=3
"""Weighted sum kernels.

out[i] = sum_k w[k] * x_k[i], accumulated in float64 in the fixed order
k = 0..N-1, then rounded once to the output dtype. The result of one element
depends only on that element of each input, so it does not depend on how the
caller chunks the tensor. Work is done in blocks of ``BLOCK`` elements,
contributor-major inside a block, so the inner loop is a plain vectorisable
multiply-add per element (no reassociation: each element has its own
accumulator).

The float32 kernel also reports non-finite inputs: it returns the index of
the first input that holds a NaN or Inf, or -1.
"""

import numpy as np
cimport numpy as cnp
from libc.stdlib cimport calloc, free, malloc

from libc.stdint cimport uint32_t

from meshmerge.cext._common cimport first_nonfinite, gather_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()



cdef extern from *:
    """
    #include "mm_par.h"
    /* Elements per block (at most MM_WSUM_BLOCK): the float64 accumulator and
       the float32 staging row stay in L1/L2 while every input streams through
       sequentially. Few inputs: 2048 (a 16 KiB accumulator in L1); many: 8192
       (64 KiB in L2, 1 MiB per core here), so each of the N streams is read in
       32 KiB runs the prefetchers follow. Measured on the 2-core EPYC, see
       BENCHMARKS.md; any block size gives the same bytes. */
    #define MM_WSUM_BLOCK 8192
    static inline Py_ssize_t mm_wsum_block_for(Py_ssize_t nk)
    {
        return nk <= 4 ? 2048 : (nk <= 8 ? 4096 : MM_WSUM_BLOCK);
    }
    /* Calls over at least this many elements write the output with
       non-temporal stores: it is far larger than the caches and not re-read by
       the kernel, so the stores skip the read-for-ownership of each line. */
    #define MM_WSUM_STREAM_MIN ((Py_ssize_t)1 << 20)
    /* One block of m elements at lo: acc[j] = sum_k w_k * v_k[j] in k order, where
       v_k = x_k (no base) or (double)x_k - (double)b[j] (task vectors). Four inputs
       per sweep: per element the additions still run k = 0, 1, 2, ... in order
       starting from 0.0 (so the grouping changes no bit), but the accumulator is
       loaded/stored once per four inputs and four sequential streams are in
       flight. Inlined with a constant has_base, so each case gets its own loops. */
    /* bad gets bit 63 set iff the float64 a is NaN or Inf (integer-only, so it vectorises). */
    #define MM_CHECK(a) do { uint64_t bits_; memcpy(&bits_, &(a), 8); \
                             bad |= (bits_ & 0x7FF0000000000000ULL) + 0x0010000000000000ULL; } while (0)
    #define MM_V(x, j) (has_base ? (double)(x)[j] - (double)bl[j] : (double)(x)[j])
    static inline __attribute__((always_inline)) void mm_wsum_block(
        const float *const *p, const double *w, Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t m,
        double *restrict acc, const float *b, const int has_base)
    {
        const float *bl = has_base ? b + lo : NULL;
        Py_ssize_t k = 0;
        if (nk >= 4) {
            const float *x0 = p[0] + lo, *x1 = p[1] + lo, *x2 = p[2] + lo, *x3 = p[3] + lo;
            const double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
            for (Py_ssize_t j = 0; j < m; j++) {
                double a = 0.0;
                a = a + w0 * MM_V(x0, j);
                a = a + w1 * MM_V(x1, j);
                a = a + w2 * MM_V(x2, j);
                a = a + w3 * MM_V(x3, j);
                acc[j] = a;
            }
            k = 4;
        } else {
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = 0.0;
        }
        for (; k + 4 <= nk; k += 4) {
            const float *x0 = p[k] + lo, *x1 = p[k + 1] + lo, *x2 = p[k + 2] + lo, *x3 = p[k + 3] + lo;
            const double w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
            for (Py_ssize_t j = 0; j < m; j++) {
                double a = acc[j];
                a = a + w0 * MM_V(x0, j);
                a = a + w1 * MM_V(x1, j);
                a = a + w2 * MM_V(x2, j);
                a = a + w3 * MM_V(x3, j);
                acc[j] = a;
            }
        }
        for (; k < nk; k++) {
            const float *x = p[k] + lo;
            const double wk = w[k];
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = acc[j] + wk * MM_V(x, j);
        }
    }

    /* Elements [lo0, hi0), with this thread's scratch (MM_WSUM_BLOCK doubles
       then MM_WSUM_BLOCK floats). Without task: out = (float)acc. With task:
       out = (float)(bb + lam * (acc * inv_den)), bb = (double)base or 0.0.
       NaN/Inf: a non-finite input always makes the float64 accumulator
       non-finite (weights are finite; NaN never cancels, Inf only into NaN), so
       the inner loops do no checks; a block whose accumulator is not finite is
       rescanned to name the inputs. */
    MM_CLONES static void mm_wsum_f32(const float *const *p, const float *b, const double *w, Py_ssize_t nk,
                                      Py_ssize_t lo0, Py_ssize_t hi0, int task, double lam, double inv_den,
                                      float *out, uint32_t *flags, double *restrict acc, int stream)
    {
        float *restrict row = (float *)(acc + MM_WSUM_BLOCK);
        const Py_ssize_t blk = mm_wsum_block_for(nk);
        for (Py_ssize_t lo = lo0; lo < hi0; lo += blk) {
            Py_ssize_t m = hi0 - lo < blk ? hi0 - lo : blk;
            if (b != NULL) mm_wsum_block(p, w, nk, lo, m, acc, b, 1);
            else mm_wsum_block(p, w, nk, lo, m, acc, b, 0);
            /* One pass over the accumulator: round to the output row and OR the
               non-finite test of each float64 sum into `bad`. */
            uint64_t bad = 0;
            if (task && b != NULL) {
                const float *bl = b + lo;
                for (Py_ssize_t j = 0; j < m; j++) {
                    MM_CHECK(acc[j]);
                    row[j] = (float)((double)bl[j] + lam * (acc[j] * inv_den));
                }
            } else if (task) {
                for (Py_ssize_t j = 0; j < m; j++) {
                    MM_CHECK(acc[j]);
                    row[j] = (float)(0.0 + lam * (acc[j] * inv_den));
                }
            } else {
                for (Py_ssize_t j = 0; j < m; j++) {
                    MM_CHECK(acc[j]);
                    row[j] = (float)acc[j];
                }
            }
            mm_put_f32(out + lo, row, m, stream);
            if (bad & 0x8000000000000000ULL) mm_flag_nonfinite(p, nk, lo, m, flags);
        }
    #if defined(__x86_64__)
        if (stream) _mm_sfence();  /* streaming stores visible before the join */
    #endif
    }

    /* Bytes of scratch one thread needs. */
    static inline size_t mm_wsum_scratch(void)
    {
        return MM_WSUM_BLOCK * (sizeof(double) + sizeof(float));
    }

    /* Thread t ORs its NaN/Inf flags into tflags[t * nk + k] and uses
       scratch + t * mm_wsum_scratch(). */
    static void mm_wsum_f32_par(const float *const *p, const float *b, const double *w, Py_ssize_t nk,
                                Py_ssize_t n, int task, double lam, double inv_den, float *out,
                                uint32_t *tflags, int nt, Py_ssize_t grain, char *scratch)
    {
        int stream = n >= MM_WSUM_STREAM_MIN;
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_wsum_f32(p, b, w, nk, lo, hi, task, lam, inv_den, out, tflags + (Py_ssize_t)tid * nk,
                        (double *)(scratch + (size_t)tid * mm_wsum_scratch()), stream);
        });
    }
    """
    void mm_wsum_f32_par(const float** p, const float* b, const double* w, Py_ssize_t nk, Py_ssize_t n,
                         int task, double lam, double inv_den, float* out, uint32_t* tflags, int nt,
                         Py_ssize_t grain, char* scratch) nogil
    size_t mm_wsum_scratch() nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil


cdef int _wsum(list inputs, object base, const double[::1] weights, float[::1] out, int task,
               double lam, double inv_den, int threads) except -2:
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(inputs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef const float* b = optional_f32(base, n)
    if weights.shape[0] != nk:
        raise ValueError(f"{nk} inputs but {weights.shape[0]} weights")
    cdef const float** ptrs = <const float**>malloc(max(nk, 1) * sizeof(float*))
    cdef uint32_t* chk = <uint32_t*>calloc(max(nk, 1) * nt, sizeof(uint32_t))
    cdef char* scratch = <char*>malloc(nt * mm_wsum_scratch())
    if ptrs == NULL or chk == NULL or scratch == NULL:
        free(ptrs); free(chk); free(scratch)
        raise MemoryError()
    try:
        gather_f32(inputs, n, ptrs)
        if n and nk:
            with nogil:
                mm_wsum_f32_par(ptrs, b, &weights[0], nk, n, task, lam, inv_den, &out[0], chk, nt, grain,
                                scratch)
        elif n:
            if task:
                raise ValueError("no inputs")
            out[:] = 0.0
        return first_nonfinite(chk, nk, nt)
    finally:
        free(ptrs)
        free(chk)
        free(scratch)


def weighted_sum_f32(list inputs, const double[::1] weights, float[::1] out, int threads=0):
    """Accumulate float32 inputs (1-D, contiguous, same length) into `out`.

    ``threads`` 0 means :func:`meshmerge.cext.threads.get_threads`; the bytes
    written do not depend on it. Returns the index of the first input
    containing NaN/Inf, or -1.
    """
    return _wsum(inputs, None, weights, out, 0, 1.0, 1.0, threads)


def task_sum_f32(list inputs, object base, const double[::1] weights, double lam, double inv_den,
                 float[::1] out, int threads=0):
    """``out = float32(b + lam * (sum_k w_k (x_k - b) * inv_den))`` with ``t = (double)x - b``.

    ``base`` None means b = 0 (delta contributions). Same operations in the same
    order as :func:`meshmerge.cext.sparse.sparse_merge` without trimming or drops.
    Returns the index of the first input containing NaN/Inf, or -1.
    """
    return _wsum(inputs, base, weights, out, 1, lam, inv_den, threads)


def weighted_sum_f64(list inputs, const double[::1] weights, double[::1] out):
    """Accumulate float64 inputs (1-D, contiguous, same length) into `out`."""
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t k, i, nk = len(inputs)
    cdef const double[::1] x
    cdef double w
    if weights.shape[0] != nk:
        raise ValueError(f"{nk} inputs but {weights.shape[0]} weights")
    with nogil:
        for i in range(n):
            out[i] = 0.0
    for k in range(nk):
        x = inputs[k]
        if x.shape[0] != n:
            raise ValueError(f"input {k} has {x.shape[0]} elements, expected {n}")
        w = weights[k]
        with nogil:
            for i in range(n):
                out[i] = out[i] + w * x[i]
