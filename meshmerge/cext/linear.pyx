# cython: language_level=3
"""Weighted sum kernels.

out[i] = sum_k w[k] * x_k[i], accumulated in float64 in the fixed order
k = 0..N-1, then rounded once to the output dtype. The result of one element
depends only on that element of each input, so it does not depend on how the
caller chunks the tensor.
"""

import numpy as np
cimport numpy as cnp

cnp.import_array()


def weighted_sum_f32(list inputs, const double[::1] weights, float[::1] out):
    """Accumulate float32 inputs (1-D, contiguous, same length) into `out`."""
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t k, i, nk = len(inputs)
    cdef const float[::1] x
    cdef double w
    if weights.shape[0] != nk:
        raise ValueError(f"{nk} inputs but {weights.shape[0]} weights")
    cdef double[::1] acc = np.zeros(n, dtype=np.float64)
    for k in range(nk):
        x = inputs[k]
        if x.shape[0] != n:
            raise ValueError(f"input {k} has {x.shape[0]} elements, expected {n}")
        w = weights[k]
        with nogil:
            for i in range(n):
                acc[i] = acc[i] + w * x[i]
    with nogil:
        for i in range(n):
            out[i] = <float>acc[i]


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
