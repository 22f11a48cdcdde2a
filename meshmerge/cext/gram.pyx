# cython: language_level=3
"""Gram matrices of contributions, for strategies that work in their span.

SLERP, Karcher/spherical means, Krum, geometric median (Weiszfeld), centered
clipping, FoolsGold and model stock only need inner products between
contributions. ``gram_accumulate`` computes all of them in one streaming pass;
the strategy then runs its (small, N-dimensional) iteration on coefficients
and a final pass writes ``sum_k c_k x_k``.

Reduction order: element ``i`` of the tensor goes to accumulator lane
``i mod 8`` (global index, not chunk-relative), each lane sums in increasing
``i`` in float64, and ``gram_finalize`` adds lanes 0..7 in order. The result
therefore does not depend on how the tensor is chunked.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from meshmerge.cext._common cimport NONFINITE, gather_f32, nonfinite_bits, optional_f32

cnp.import_array()

cdef enum:
    LANES = 8


cdef inline void _scalar_step(
    const float** ptrs, const float* b, Py_ssize_t nk, Py_ssize_t i, uint64_t lane,
    double* vb, uint32_t* flags, double[:, :, ::1] lanes,
) noexcept nogil:
    """One element into its lane: the unaligned head and the tail of a chunk."""
    cdef Py_ssize_t j, k
    cdef double bi = 0.0 if b == NULL else <double>b[i]
    for j in range(nk):
        flags[j] = flags[j] | nonfinite_bits(ptrs[j][i])
        vb[j] = <double>ptrs[j][i] - bi
    for j in range(nk):
        for k in range(j, nk):
            lanes[j, k, lane] += vb[j] * vb[k]


def gram_accumulate(list xs, object base, uint64_t start, double[:, :, ::1] lanes):
    """Add sum over this chunk of v_j[i] * v_k[i] (j <= k) into ``lanes[j, k, i mod 8]``.

    ``v_k = x_k - base`` in float64 (``base`` None means 0). ``start`` is the
    global index of the chunk's first element. Returns first bad input or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        raise ValueError("no inputs")
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    if lanes.shape[0] != nk or lanes.shape[1] != nk or lanes.shape[2] != LANES:
        raise ValueError("lanes must have shape (N, N, 8)")
    cdef const float** ptrs = <const float**>malloc(nk * sizeof(float*))
    cdef double* vb = <double*>malloc(nk * LANES * sizeof(double))
    cdef uint32_t* flags = <uint32_t*>malloc(nk * sizeof(uint32_t))
    cdef const float* b
    cdef Py_ssize_t i, j, k, l, head
    cdef double* row
    cdef int bad = -1
    if ptrs == NULL or vb == NULL or flags == NULL:
        free(ptrs); free(vb); free(flags)
        raise MemoryError()
    try:
        gather_f32(xs, n, ptrs)
        b = optional_f32(base, n)
        with nogil:
            for k in range(nk):
                flags[k] = 0
            head = <Py_ssize_t>((LANES - (start % LANES)) % LANES)
            if head > n:
                head = n
            i = 0
            while i < head:
                _scalar_step(ptrs, b, nk, i, (start + <uint64_t>i) % LANES, vb, flags, lanes)
                i += 1
            while i + LANES <= n:
                for j in range(nk):
                    for l in range(LANES):
                        flags[j] = flags[j] | nonfinite_bits(ptrs[j][i + l])
                        vb[j * LANES + l] = <double>ptrs[j][i + l] - (0.0 if b == NULL else <double>b[i + l])
                for j in range(nk):
                    for k in range(j, nk):
                        row = &lanes[j, k, 0]
                        for l in range(LANES):
                            row[l] = row[l] + vb[j * LANES + l] * vb[k * LANES + l]
                i += LANES
            while i < n:
                _scalar_step(ptrs, b, nk, i, (start + <uint64_t>i) % LANES, vb, flags, lanes)
                i += 1
            for k in range(nk):
                if (flags[k] & NONFINITE) and bad < 0:
                    bad = k
        return bad
    finally:
        free(ptrs); free(vb); free(flags)


def gram_finalize(const double[:, :, ::1] lanes):
    """Symmetric (N, N) float64 Gram matrix: lanes summed in order 0..7."""
    cdef Py_ssize_t nk = lanes.shape[0]
    cdef Py_ssize_t j, k, l
    cdef double acc
    g = np.empty((nk, nk), dtype=np.float64)
    cdef double[:, ::1] gv = g
    for j in range(nk):
        for k in range(j, nk):
            acc = 0.0
            for l in range(LANES):
                acc = acc + lanes[j, k, l]
            gv[j, k] = acc
            gv[k, j] = acc
    return g
