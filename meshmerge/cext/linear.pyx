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

from meshmerge.cext._common cimport NONFINITE, gather_f32

cnp.import_array()



cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    #ifndef MM_CLONES
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    /* Same IEEE operations in the same order on every clone (no FMA contraction:
       -ffp-contract=off), only the vector width differs, so bytes do not. */
    #define MM_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define MM_CLONES
    #endif
    #endif
    #define MM_WSUM_BLOCK 2048
    /* Four inputs per sweep: per element the additions still run k = 0, 1, 2, ...
       in order, but the accumulator is loaded/stored once per four inputs and
       four streams are in flight, which keeps the prefetchers busy for large N. */
    MM_CLONES static void mm_wsum_f32(const float *const *p, const double *w, Py_ssize_t nk,
                                      Py_ssize_t n, float *out, uint32_t *flags)
    {
        double acc[MM_WSUM_BLOCK];
        for (Py_ssize_t lo = 0; lo < n; lo += MM_WSUM_BLOCK) {
            Py_ssize_t m = n - lo < MM_WSUM_BLOCK ? n - lo : MM_WSUM_BLOCK;
            for (Py_ssize_t j = 0; j < m; j++) acc[j] = 0.0;
            Py_ssize_t k = 0;
            for (; k + 4 <= nk; k += 4) {
                const float *x0 = p[k] + lo, *x1 = p[k + 1] + lo, *x2 = p[k + 2] + lo, *x3 = p[k + 3] + lo;
                const double w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
                uint32_t f0 = 0, f1 = 0, f2 = 0, f3 = 0;
                for (Py_ssize_t j = 0; j < m; j++) {
                    float v0 = x0[j], v1 = x1[j], v2 = x2[j], v3 = x3[j];
                    uint32_t b0, b1, b2, b3;
                    memcpy(&b0, &v0, 4); memcpy(&b1, &v1, 4); memcpy(&b2, &v2, 4); memcpy(&b3, &v3, 4);
                    double a = acc[j];
                    a = a + w0 * (double)v0;
                    a = a + w1 * (double)v1;
                    a = a + w2 * (double)v2;
                    a = a + w3 * (double)v3;
                    acc[j] = a;
                    f0 |= (b0 & 0x7F800000u) + 0x00800000u;
                    f1 |= (b1 & 0x7F800000u) + 0x00800000u;
                    f2 |= (b2 & 0x7F800000u) + 0x00800000u;
                    f3 |= (b3 & 0x7F800000u) + 0x00800000u;
                }
                flags[k] |= f0; flags[k + 1] |= f1; flags[k + 2] |= f2; flags[k + 3] |= f3;
            }
            for (; k < nk; k++) {
                const float *x = p[k] + lo;
                const double wk = w[k];
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < m; j++) {
                    float v = x[j];
                    uint32_t bits;
                    memcpy(&bits, &v, 4);
                    acc[j] = acc[j] + wk * (double)v;
                    f |= (bits & 0x7F800000u) + 0x00800000u;
                }
                flags[k] |= f;
            }
            for (Py_ssize_t j = 0; j < m; j++) out[lo + j] = (float)acc[j];
        }
    }
    """
    void mm_wsum_f32(const float** p, const double* w, Py_ssize_t nk, Py_ssize_t n,
                     float* out, uint32_t* flags) nogil


def weighted_sum_f32(list inputs, const double[::1] weights, float[::1] out):
    """Accumulate float32 inputs (1-D, contiguous, same length) into `out`.

    Returns the index of the first input containing NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(inputs)
    cdef Py_ssize_t k
    if weights.shape[0] != nk:
        raise ValueError(f"{nk} inputs but {weights.shape[0]} weights")
    cdef const float** ptrs = <const float**>malloc(max(nk, 1) * sizeof(float*))
    cdef uint32_t* chk = <uint32_t*>calloc(max(nk, 1), sizeof(uint32_t))
    if ptrs == NULL or chk == NULL:
        free(ptrs); free(chk)
        raise MemoryError()
    try:
        gather_f32(inputs, n, ptrs)
        if n and nk:
            with nogil:
                mm_wsum_f32(ptrs, &weights[0], nk, n, &out[0], chk)
        elif n:
            out[:] = 0.0
        for k in range(nk):
            if chk[k] & NONFINITE:
                return k
        return -1
    finally:
        free(ptrs)
        free(chk)


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
