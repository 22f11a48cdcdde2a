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
from libc.stdlib cimport free, malloc

from libc.stdint cimport uint32_t

from meshmerge.cext._common cimport NONFINITE, f32_bits, gather_f32, nonfinite_bits

cnp.import_array()

cdef enum:
    BLOCK = 512


def weighted_sum_f32(list inputs, const double[::1] weights, float[::1] out):
    """Accumulate float32 inputs (1-D, contiguous, same length) into `out`.

    Returns the index of the first input containing NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(inputs)
    cdef Py_ssize_t k, i, j, lo, m
    cdef double acc[BLOCK]
    cdef double w
    cdef float x
    cdef const float* p
    if weights.shape[0] != nk:
        raise ValueError(f"{nk} inputs but {weights.shape[0]} weights")
    cdef const float** ptrs = <const float**>malloc(max(nk, 1) * sizeof(float*))
    cdef uint32_t* chk = <uint32_t*>malloc(max(nk, 1) * sizeof(uint32_t))
    cdef uint32_t f
    if ptrs == NULL or chk == NULL:
        free(ptrs); free(chk)
        raise MemoryError()
    try:
        gather_f32(inputs, n, ptrs)
        with nogil:
            for k in range(nk):
                chk[k] = 0
            lo = 0
            while lo < n:
                m = min(BLOCK, n - lo)
                for j in range(m):
                    acc[j] = 0.0
                for k in range(nk):
                    p = ptrs[k] + lo
                    w = weights[k]
                    f = 0
                    for j in range(m):
                        x = p[j]
                        acc[j] = acc[j] + w * x
                        f = f | nonfinite_bits(x)
                    chk[k] = chk[k] | f
                for j in range(m):
                    out[lo + j] = <float>acc[j]
                lo += m
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
