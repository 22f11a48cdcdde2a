# cython: language_level=3
"""Coordinate-wise robust aggregators: median and trimmed mean.

Per element the N values are sorted (odd-even transposition sort, vectorised
across a block of elements; N is the number of contributions, small) and
reduced in sorted order in float64, so the result
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
from libc.stdlib cimport calloc, free, malloc

from meshmerge.cext._common cimport first_nonfinite, gather_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include "mm_par.h"
    #define MM_SORT_BLOCK 256
    /* Odd-even transposition sort of the N values of every element of a block,
       stored contributor-major (buf[k * BLOCK + j]), so each compare-exchange
       runs across 256 elements at once (vectorises). N rounds sort N values.
       Compare-exchange keeps equal values in place, so the sorted sequence is
       the same multiset ordering as any stable sort. */
    MM_CLONES static void mm_sorted_reduce(const float *const *p, Py_ssize_t nk, Py_ssize_t lo0,
                                           Py_ssize_t hi0, int mode, Py_ssize_t trim, float *out,
                                           float *buf, uint32_t *flags)
    {
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SORT_BLOCK) {
            Py_ssize_t m = hi0 - i0 < MM_SORT_BLOCK ? hi0 - i0 : MM_SORT_BLOCK;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = p[k] + i0;
                float *row = buf + k * MM_SORT_BLOCK;
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < m; j++) {
                    uint32_t bits;
                    memcpy(&bits, &x[j], 4);
                    f |= (bits & 0x7F800000u) + 0x00800000u;
                    row[j] = x[j];
                }
                flags[k] |= f;
            }
            for (Py_ssize_t r = 0; r < nk; r++) {
                for (Py_ssize_t k = r & 1; k + 1 < nk; k += 2) {
                    /* Bitwise select on the float bit patterns: no branches, so it vectorises
                       without -fno-trapping-math. */
                    uint32_t *a = (uint32_t *)(buf + k * MM_SORT_BLOCK), *b = a + MM_SORT_BLOCK;
                    for (Py_ssize_t j = 0; j < m; j++) {
                        uint32_t ub = a[j], vb = b[j];
                        float u, v;
                        memcpy(&u, &ub, 4);
                        memcpy(&v, &vb, 4);
                        uint32_t msk = (uint32_t)0 - (uint32_t)(v < u);
                        a[j] = (vb & msk) | (ub & ~msk);
                        b[j] = (ub & msk) | (vb & ~msk);
                    }
                }
            }
            if (mode == 0) {
                if (nk & 1) {
                    const float *mid = buf + (nk / 2) * MM_SORT_BLOCK;
                    for (Py_ssize_t j = 0; j < m; j++) out[i0 + j] = mid[j];
                } else {
                    const float *lo = buf + (nk / 2 - 1) * MM_SORT_BLOCK, *hi = lo + MM_SORT_BLOCK;
                    for (Py_ssize_t j = 0; j < m; j++)
                        out[i0 + j] = (float)(((double)lo[j] + (double)hi[j]) * 0.5);
                }
            } else {
                double acc[MM_SORT_BLOCK];
                for (Py_ssize_t j = 0; j < m; j++) acc[j] = 0.0;
                for (Py_ssize_t r = trim; r < nk - trim; r++) {
                    const float *row = buf + r * MM_SORT_BLOCK;
                    for (Py_ssize_t j = 0; j < m; j++) acc[j] = acc[j] + (double)row[j];
                }
                const double cnt = (double)(nk - 2 * trim);
                for (Py_ssize_t j = 0; j < m; j++) out[i0 + j] = (float)(acc[j] / cnt);
            }
        }
    }

    /* Thread t uses buf + t * nk * BLOCK and tflags + t * nk. */
    static void mm_sorted_reduce_par(const float *const *p, Py_ssize_t nk, Py_ssize_t n, int mode,
                                     Py_ssize_t trim, float *out, float *buf, uint32_t *tflags,
                                     int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_sorted_reduce(p, nk, lo, hi, mode, trim, out, buf + (Py_ssize_t)tid * nk * MM_SORT_BLOCK,
                             tflags + (Py_ssize_t)tid * nk);
        });
    }
    """
    void mm_sorted_reduce_par(const float** p, Py_ssize_t nk, Py_ssize_t n, int mode, Py_ssize_t trim,
                              float* out, float* buf, unsigned int* tflags, int nt, Py_ssize_t grain) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil


cdef enum:
    BLOCK = 256


def sorted_reduce(list xs, int mode, Py_ssize_t trim, float[::1] out, int threads=0):
    """mode 0: median, mode 1: trimmed mean. Returns first input index with NaN/Inf, or -1.

    ``threads`` 0 means :func:`meshmerge.cext.threads.get_threads` (no effect on the bytes).
    """
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef Py_ssize_t t
    if nk == 0:
        raise ValueError("no inputs")
    if mode not in (0, 1):
        raise ValueError("mode must be 0 (median) or 1 (trimmed mean)")
    if mode == 1 and not 0 <= 2 * trim < nk:
        raise ValueError("trim must leave at least one value")
    cdef const float** ptrs = <const float**>malloc(nk * sizeof(float*))
    cdef float* buf = <float*>malloc(nt * nk * BLOCK * sizeof(float))
    cdef uint32_t* flags = <uint32_t*>calloc(nt * nk, sizeof(uint32_t))
    if ptrs == NULL or buf == NULL or flags == NULL:
        free(ptrs); free(buf); free(flags)
        raise MemoryError()
    try:
        gather_f32(xs, n, ptrs)
        if n:
            with nogil:
                mm_sorted_reduce_par(ptrs, nk, n, mode, trim, &out[0], buf, flags, nt, grain)
        return first_nonfinite(flags, nk, nt)
    finally:
        free(ptrs); free(buf); free(flags)
