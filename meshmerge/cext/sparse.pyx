# cython: language_level=3
"""Sparsified task-vector merges: TIES, DARE, DARE-TIES, breadcrumbs, task arithmetic.

All of these compute, per element ``i`` and contributor ``k``, the task value
``t = x_k[i] - b[i]`` in float64 (exact for float32 inputs whose exponents are
within 29 of each other; ``b`` is 0 for delta contributions), keep or drop it,
optionally elect a sign, and combine:

* magnitude trim: keep iff ``lo[k] <= |t|_f32 < hi[k]`` where ``|t|_f32`` is
  ``|t|`` rounded to float32 (the quantity the thresholds were selected on);
* random drop (DARE): element ``i`` uses the 16-bit lane ``i mod 4`` of draw
  ``i div 4`` of stream ``key[k]`` (four elements per SplitMix64 output) and is
  dropped iff that 16-bit value is ``< drop_thr``, so the drop probability is
  exactly ``drop_thr / 65536``; kept values are multiplied by ``rescale``;
* sign election: ``consensus`` 1 = sign of sum_k w_k v_k ("total"), 2 = sign of
  sum_k sign(v_k) ("count"), 0 = none (every kept value agrees);
* disjoint mean: sum of agreeing w_k v_k divided by the sum of the weights of
  the agreeing entries (0 where none agree); otherwise the agreeing sum times
  ``inv_den``;
* ``out[i] = float32(b + lam * mean)``.

Selections are written as multiplications by 0.0/1.0 rather than branches so
the loops vectorise without ``-fno-trapping-math``; a dropped value becomes a
signed zero, which no later sum can observe (every accumulator starts at +0).
Every sum runs over k = 0..N-1 in order in float64, per element, so results
do not depend on chunking. Magnitude thresholds come from an exact two-pass
radix selection over the float32 bit patterns (``mag_hist_hi``/``mag_hist_lo``):
O(n) time, O(1) extra memory per contributor, no sort.
"""

import numpy as np
cimport numpy as cnp
from libc.math cimport fabs
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from meshmerge.cext._common cimport (
    NONFINITE,
    f32_bits,
    gather_f32,
    nonfinite_bits,
    optional_f32,
    splitmix64_at,
)

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    #include <stdint.h>
    #ifndef MM_CLONES
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define MM_CLONES __attribute__((target_clones("avx2", "default")))
    #else
    #define MM_CLONES
    #endif
    #endif
    #define MM_SPARSE_BLOCK 128

    static inline uint64_t mm_splitmix64_at(uint64_t key, uint64_t index) {
        uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    static inline uint32_t mm_nonfinite_bits(float x) {
        uint32_t b;
        memcpy(&b, &x, 4);
        return (b & 0x7F800000u) + 0x00800000u;
    }

    /* See the module docstring for the definition; every loop is per element
       with k in ascending order, so vector width changes no result. */
    MM_CLONES static void mm_sparse_merge(
        const float *const *p, const float *b, const double *w, const float *lo, const float *hi,
        const uint64_t *keys, uint64_t drop_thr, double rescale, int consensus, int disjoint,
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t n,
        float *out, uint32_t *flags, double *vals)
    {
        double s[MM_SPARSE_BLOCK], num[MM_SPARSE_BLOCK], den[MM_SPARSE_BLOCK], bb[MM_SPARSE_BLOCK];
        for (Py_ssize_t i0 = 0; i0 < n; i0 += MM_SPARSE_BLOCK) {
            Py_ssize_t m = n - i0 < MM_SPARSE_BLOCK ? n - i0 : MM_SPARSE_BLOCK;
            for (Py_ssize_t j = 0; j < m; j++) {
                bb[j] = b == NULL ? 0.0 : (double)b[i0 + j];
                s[j] = 0.0; num[j] = 0.0; den[j] = 0.0;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = p[k] + i0;
                double *vk = vals + k * MM_SPARSE_BLOCK;
                const float lok = lo[k], hik = hi[k];
                const double wk = w[k];
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < m; j++) {
                    f |= mm_nonfinite_bits(x[j]);
                    double t = (double)x[j] - bb[j];
                    float a = (float)fabs(t);
                    vk[j] = (t * rescale) * (double)((a >= lok) & (a < hik));
                }
                flags[k] |= f;
                if (keys != NULL) {
                    const uint64_t key = keys[k];
                    const uint64_t pos = start + (uint64_t)i0;
                    /* Keep multipliers (1.0 / 0.0) from the 16-bit lanes, then one
                       vectorisable multiply. Integer compares in int32 (u < 2^16). */
                    double keep[MM_SPARSE_BLOCK];
                    const int32_t thr = (int32_t)drop_thr;
                    if ((pos & 3) == 0) {
                        Py_ssize_t nd = m >> 2;
                        for (Py_ssize_t d = 0; d < nd; d++) {
                            uint64_t z = mm_splitmix64_at(key, (pos >> 2) + (uint64_t)d);
                            keep[4 * d] = (double)((int32_t)(z & 0xFFFFu) >= thr);
                            keep[4 * d + 1] = (double)((int32_t)((z >> 16) & 0xFFFFu) >= thr);
                            keep[4 * d + 2] = (double)((int32_t)((z >> 32) & 0xFFFFu) >= thr);
                            keep[4 * d + 3] = (double)((int32_t)(z >> 48) >= thr);
                        }
                        for (Py_ssize_t j = 4 * nd; j < m; j++) {
                            uint64_t gi = pos + (uint64_t)j;
                            uint64_t z = mm_splitmix64_at(key, gi >> 2);
                            keep[j] = (double)((int32_t)((z >> ((gi & 3) << 4)) & 0xFFFFu) >= thr);
                        }
                    } else {
                        for (Py_ssize_t j = 0; j < m; j++) {
                            uint64_t gi = pos + (uint64_t)j;
                            uint64_t z = mm_splitmix64_at(key, gi >> 2);
                            keep[j] = (double)((int32_t)((z >> ((gi & 3) << 4)) & 0xFFFFu) >= thr);
                        }
                    }
                    for (Py_ssize_t j = 0; j < m; j++) vk[j] = vk[j] * keep[j];
                }
                if (consensus == 1) {
                    for (Py_ssize_t j = 0; j < m; j++) s[j] = s[j] + wk * vk[j];
                } else if (consensus == 2) {
                    for (Py_ssize_t j = 0; j < m; j++)
                        s[j] = s[j] + (double)((vk[j] > 0.0) - (vk[j] < 0.0));
                }
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const double *vk = vals + k * MM_SPARSE_BLOCK;
                const double wk = w[k];
                if (consensus == 0 && !disjoint) {
                    for (Py_ssize_t j = 0; j < m; j++) num[j] = num[j] + wk * vk[j];
                } else if (consensus == 0) {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        num[j] = num[j] + wk * vk[j];
                        den[j] = den[j] + wk * (double)(vk[j] != 0.0);
                    }
                } else {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double v = vk[j];
                        double g = (double)(((v > 0.0) & (s[j] > 0.0)) | ((v < 0.0) & (s[j] < 0.0)));
                        num[j] = num[j] + (wk * v) * g;
                        den[j] = den[j] + wk * g;
                    }
                }
            }
            if (disjoint) {
                for (Py_ssize_t j = 0; j < m; j++) {
                    double e = num[j] / (den[j] + (double)(den[j] == 0.0));
                    out[i0 + j] = (float)(bb[j] + lam * e);
                }
            } else {
                for (Py_ssize_t j = 0; j < m; j++)
                    out[i0 + j] = (float)(bb[j] + lam * (num[j] * inv_den));
            }
        }
    }
    """
    void mm_sparse_merge(
        const float** p, const float* b, const double* w, const float* lo, const float* hi,
        const uint64_t* keys, uint64_t drop_thr, double rescale, int consensus, int disjoint,
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t n,
        float* out, uint32_t* flags, double* vals) nogil


cdef enum:
    BLOCK = 128
    HI_BINS = 65536
    LO_BINS = 32768


cdef class _Ptrs:
    cdef const float** p
    cdef Py_ssize_t n

    def __cinit__(self, list xs, Py_ssize_t length):
        self.n = len(xs)
        self.p = <const float**>malloc(max(self.n, 1) * sizeof(float*))
        if self.p == NULL:
            raise MemoryError()
        gather_f32(xs, length, self.p)

    def __dealloc__(self):
        free(self.p)


def mag_hist_hi(list xs, object base, cnp.uint64_t[:, ::1] hist):
    """Add the counts of ``bits(|x_k - b|_f32) >> 15`` to ``hist[k]`` (shape (N, 65536)).

    Returns the index of the first input with NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        return -1
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef Py_ssize_t k, i
    cdef const float* p
    cdef float a
    cdef uint32_t f
    cdef int bad = -1
    if hist.shape[0] != nk or hist.shape[1] != HI_BINS:
        raise ValueError("hist must have shape (N, 65536)")
    with nogil:
        for k in range(nk):
            p = ptrs.p[k]
            f = 0
            if b == NULL:
                for i in range(n):
                    a = fabs(p[i])
                    f = f | nonfinite_bits(a)
                    hist[k, f32_bits(a) >> 15] += 1
            else:
                for i in range(n):
                    a = <float>fabs(<double>p[i] - <double>b[i])
                    f = f | nonfinite_bits(p[i])
                    hist[k, f32_bits(a) >> 15] += 1
            if (f & NONFINITE) and bad < 0:
                bad = k
    return bad


def mag_hist_lo(list xs, object base, const uint32_t[:, ::1] target, cnp.uint64_t[:, :, ::1] hist):
    """For each k and each target high bin ``target[k, r]`` (r < 2), count the low 15 bits.

    ``hist`` has shape (N, R, 32768); only elements whose high bits equal the
    target are counted.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        return
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef Py_ssize_t nr = target.shape[1]
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef Py_ssize_t k, i
    cdef const float* p
    cdef float a
    cdef uint32_t bits, hi, t0, t1
    cdef cnp.uint64_t* h0
    cdef cnp.uint64_t* h1
    if nr < 1 or nr > 2:
        raise ValueError("between 1 and 2 target bins per input")
    if target.shape[0] != nk or hist.shape[0] != nk or hist.shape[1] != nr or hist.shape[2] != LO_BINS:
        raise ValueError("target must be (N, R) and hist (N, R, 32768)")
    with nogil:
        for k in range(nk):
            p = ptrs.p[k]
            t0 = target[k, 0]
            h0 = &hist[k, 0, 0]
            t1 = target[k, nr - 1]
            h1 = &hist[k, 1, 0] if nr == 2 else NULL
            for i in range(n):
                if b == NULL:
                    bits = f32_bits(p[i]) & 0x7FFFFFFFu
                else:
                    a = <float>fabs(<double>p[i] - <double>b[i])
                    bits = f32_bits(a)
                hi = bits >> 15
                if hi == t0:
                    h0[bits & 0x7FFFu] += 1
                if h1 != NULL and hi == t1:
                    h1[bits & 0x7FFFu] += 1


def sparse_merge(
    list xs,
    object base,
    const double[::1] w,
    const float[::1] lo,
    const float[::1] hi,
    object keys,
    uint64_t drop_thr,
    double rescale,
    int consensus,
    bint disjoint,
    double inv_den,
    double lam,
    uint64_t start,
    float[::1] out,
):
    """See the module docstring. ``keys`` is None (no random drop) or uint64 (N,).

    ``start`` is the global index of ``out[0]`` inside the tensor (for the PRNG).
    Returns the index of the first input with NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t n = out.shape[0]
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef const cnp.uint64_t[::1] kv
    cdef const uint64_t* kp = NULL
    if keys is not None:
        kv = keys
        if kv.shape[0] != nk:
            raise ValueError("keys must have one entry per input")
        kp = <const uint64_t*>&kv[0]
    if w.shape[0] != nk or lo.shape[0] != nk or hi.shape[0] != nk:
        raise ValueError("w, lo, hi must have one entry per input")
    if nk == 0:
        raise ValueError("no inputs")
    cdef double* vals = <double*>malloc(nk * BLOCK * sizeof(double))
    cdef uint32_t* flags = <uint32_t*>calloc(nk, sizeof(uint32_t))
    cdef Py_ssize_t k
    cdef int bad = -1
    if vals == NULL or flags == NULL:
        free(vals); free(flags)
        raise MemoryError()
    try:
        if n:
            with nogil:
                mm_sparse_merge(
                    ptrs.p, b, &w[0], &lo[0], &hi[0], kp, drop_thr, rescale, consensus, disjoint,
                    inv_den, lam, start, nk, n, &out[0], flags, vals,
                )
        for k in range(nk):
            if (flags[k] & NONFINITE) and bad < 0:
                bad = k
        return bad
    finally:
        free(vals)
        free(flags)
