# cython: language_level=3
"""Coordinate-wise robust aggregators: median and trimmed mean.

Per element the N values are sorted (insertion sort; N is the number of
contributions, small) and reduced in sorted order in float64, so the result
depends only on the multiset of values: any arrival order gives the same
bytes. Contributor weights are not used (they are self-declared, so a
Byzantine contributor could inflate them); every contribution is one vote.

* median: the middle value (odd N) or the float64 mean of the two middle
  values (even N), rounded once to float32;
* trimmed mean: drop ``trim`` smallest and ``trim`` largest values, float64
  mean of the rest in ascending order, rounded once.
"""

cimport numpy as cnp
from libc.stdint cimport uint32_t
from libc.stdlib cimport free, malloc

from meshmerge.cext._common cimport NONFINITE, gather_f32, nonfinite_bits

cnp.import_array()

cdef enum:
    BLOCK = 256


def sorted_reduce(list xs, int mode, Py_ssize_t trim, float[::1] out):
    """mode 0: median, mode 1: trimmed mean. Returns first input index with NaN/Inf, or -1."""
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t n = out.shape[0]
    if nk == 0:
        raise ValueError("no inputs")
    if mode == 1 and not 0 <= 2 * trim < nk:
        raise ValueError("trim must leave at least one value")
    cdef const float** ptrs = <const float**>malloc(nk * sizeof(float*))
    cdef float* buf = <float*>malloc(nk * BLOCK * sizeof(float))
    cdef float* v = <float*>malloc(nk * sizeof(float))
    cdef uint32_t* flags = <uint32_t*>malloc(nk * sizeof(uint32_t))
    cdef Py_ssize_t k, j, q, r, i0, m
    cdef float x
    cdef double acc
    cdef uint32_t f
    cdef int bad = -1
    cdef const float* p
    if ptrs == NULL or buf == NULL or v == NULL or flags == NULL:
        free(ptrs); free(buf); free(v); free(flags)
        raise MemoryError()
    try:
        gather_f32(xs, n, ptrs)
        with nogil:
            for k in range(nk):
                flags[k] = 0
            i0 = 0
            while i0 < n:
                m = min(<Py_ssize_t>BLOCK, n - i0)
                for k in range(nk):
                    p = ptrs[k] + i0
                    f = 0
                    for j in range(m):
                        buf[j * nk + k] = p[j]
                        f = f | nonfinite_bits(p[j])
                    flags[k] = flags[k] | f
                for j in range(m):
                    for k in range(nk):
                        x = buf[j * nk + k]
                        q = k
                        while q > 0 and v[q - 1] > x:
                            v[q] = v[q - 1]
                            q -= 1
                        v[q] = x
                    if mode == 0:
                        if nk & 1:
                            out[i0 + j] = v[nk // 2]
                        else:
                            out[i0 + j] = <float>((<double>v[nk // 2 - 1] + <double>v[nk // 2]) * 0.5)
                    else:
                        acc = 0.0
                        for r in range(trim, nk - trim):
                            acc = acc + <double>v[r]
                        out[i0 + j] = <float>(acc / <double>(nk - 2 * trim))
                i0 += m
            for k in range(nk):
                if (flags[k] & NONFINITE) and bad < 0:
                    bad = k
        return bad
    finally:
        free(ptrs); free(buf); free(v); free(flags)
