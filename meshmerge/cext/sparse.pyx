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
do not depend on chunking or threads. Magnitude thresholds are exact order
statistics of the float32 bit patterns, found by counting passes of
``mag_range`` (a count above a range plus a histogram inside it): O(n) time per
pass, O(bins) extra memory per contributor, no sort.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from libc.stdint cimport int32_t, uint8_t

from meshmerge.cext._common cimport NONFINITE, gather_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"
    #define MM_SPARSE_BLOCK 512

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
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t lo0, Py_ssize_t hi0,
        float *out, uint32_t *flags, double *vals)
    {
        double s[MM_SPARSE_BLOCK], num[MM_SPARSE_BLOCK], den[MM_SPARSE_BLOCK], bb[MM_SPARSE_BLOCK];
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SPARSE_BLOCK) {
            Py_ssize_t m = hi0 - i0 < MM_SPARSE_BLOCK ? hi0 - i0 : MM_SPARSE_BLOCK;
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

    /* Thread t uses vals + t * nk * BLOCK and tflags + t * nk. */
    static void mm_sparse_merge_par(
        const float *const *p, const float *b, const double *w, const float *flo, const float *fhi,
        const uint64_t *keys, uint64_t drop_thr, double rescale, int consensus, int disjoint,
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t n,
        float *out, uint32_t *tflags, double *vals, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_sparse_merge(p, b, w, flo, fhi, keys, drop_thr, rescale, consensus, disjoint, inv_den, lam,
                            start, nk, lo, hi, out, tflags + (Py_ssize_t)tid * nk,
                            vals + (Py_ssize_t)tid * nk * MM_SPARSE_BLOCK);
        });
    }

    #define MM_MAG_BLOCK 256
    #define MM_MAG_SPAN 8192
    /* Magnitude bit patterns u = bits(|x - b|_f32) (non-negative floats order like
       their bits). For every contributor k and active target r (slot kr = k * R + r):
       above[kr] += #{u > hi[kr]}, and for lo[kr] <= u <= hi[kr]:
       hist[kr * nbins + ((u - lo[kr]) >> shift[kr])] += 1. Elements [lo0, hi0). */
    MM_CLONES static void mm_mag_range(
        const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t lo0, Py_ssize_t hi0,
        const uint32_t *lo, const uint32_t *hi, const int32_t *shift, const uint8_t *active,
        Py_ssize_t nbins, uint64_t *above, uint32_t *hist, uint32_t *flags)
    {
        uint32_t u[MM_MAG_BLOCK];
        /* Input-major over spans of MM_MAG_SPAN elements: two long streams (x_k and the
           base span, which stays in cache for the next input) instead of N + 1 short
           ones, which the prefetchers follow badly for large N. */
        for (Py_ssize_t s0 = lo0; s0 < hi0; s0 += MM_MAG_SPAN) {
            Py_ssize_t s1 = hi0 - s0 < MM_MAG_SPAN ? hi0 : s0 + MM_MAG_SPAN;
            for (Py_ssize_t k = 0; k < nk; k++) {
                int any = 0;
                for (Py_ssize_t r = 0; r < R; r++) any |= active[k * R + r];
                if (!any) continue;
                const float *x = p[k];
                uint32_t f = 0;
                for (Py_ssize_t i0 = s0; i0 < s1; i0 += MM_MAG_BLOCK) {
                    Py_ssize_t m = s1 - i0 < MM_MAG_BLOCK ? s1 - i0 : MM_MAG_BLOCK;
                    if (b == NULL) {
                        for (Py_ssize_t j = 0; j < m; j++) {
                            uint32_t bits;
                            memcpy(&bits, &x[i0 + j], 4);
                            f |= (bits & 0x7F800000u) + 0x00800000u;
                            u[j] = bits & 0x7FFFFFFFu;
                        }
                    } else {
                        /* float32 x - b is the correctly rounded difference, the same value
                           as (float)((double)x - (double)b) (double rounding through a format
                           with >= 2p + 2 bits is harmless for subtraction), at half the work. */
                        for (Py_ssize_t j = 0; j < m; j++) {
                            uint32_t bits, ab;
                            memcpy(&bits, &x[i0 + j], 4);
                            f |= (bits & 0x7F800000u) + 0x00800000u;
                            float a = x[i0 + j] - b[i0 + j];
                            memcpy(&ab, &a, 4);
                            u[j] = ab & 0x7FFFFFFFu;
                        }
                    }
                    for (Py_ssize_t r = 0; r < R; r++) {
                        Py_ssize_t kr = k * R + r;
                        if (!active[kr]) continue;
                        const uint32_t l = lo[kr], h = hi[kr], span = h - l;
                        const int sh = shift[kr];
                        uint32_t *hk = hist + kr * nbins;
                        /* One vectorised sweep counts both; the histogram is only touched
                           where a group of 16 has elements in range (rare for a narrow range). */
                        uint32_t cnt = 0, nin = 0;
                        for (Py_ssize_t j = 0; j < m; j++) {
                            cnt += (uint32_t)(u[j] > h);
                            nin += (uint32_t)(u[j] - l <= span);
                        }
                        above[kr] += cnt;
                        /* Visit only the hits, via a bit mask per group of 32 (a plain loop
                           with a conditional increment gets vectorised into a masked
                           scatter, which is many times slower on some CPUs). */
                        for (Py_ssize_t j0 = 0; j0 < m && nin; j0 += 32) {
                            Py_ssize_t e = m - j0 < 32 ? m - j0 : 32;
                            uint32_t msk = 0;
                            for (Py_ssize_t j = 0; j < e; j++)
                                msk |= (uint32_t)(u[j0 + j] - l <= span) << j;
                            while (msk) {
                                int j = __builtin_ctz(msk);
                                msk &= msk - 1;
                                hk[(u[j0 + j] - l) >> sh]++;
                                nin--;
                            }
                        }
                    }
                }
                flags[k] |= f;
            }
        }
    }

    /* Thread t adds into above + t * nk * R, hist + t * nk * R * nbins, tflags + t * nk. */
    static void mm_mag_range_par(
        const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t n,
        const uint32_t *tlo, const uint32_t *thi, const int32_t *shift, const uint8_t *active,
        Py_ssize_t nbins, uint64_t *above, uint32_t *hist, uint32_t *tflags, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_mag_range(p, b, nk, R, lo, hi, tlo, thi, shift, active, nbins,
                         above + (Py_ssize_t)tid * nk * R, hist + (Py_ssize_t)tid * nk * R * nbins,
                         tflags + (Py_ssize_t)tid * nk);
        });
    }
    """
    void mm_sparse_merge_par(
        const float** p, const float* b, const double* w, const float* lo, const float* hi,
        const uint64_t* keys, uint64_t drop_thr, double rescale, int consensus, int disjoint,
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t n,
        float* out, uint32_t* tflags, double* vals, int nt, Py_ssize_t grain) nogil
    void mm_mag_range_par(
        const float** p, const float* b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t n,
        const uint32_t* tlo, const uint32_t* thi, const int32_t* shift, const uint8_t* active,
        Py_ssize_t nbins, uint64_t* above, uint32_t* hist, uint32_t* tflags, int nt, Py_ssize_t grain) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil


cdef enum:
    BLOCK = 512


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


cdef int _first_bad(uint32_t* tflags, Py_ssize_t nk, int nt) noexcept:
    """OR the per-thread NaN/Inf flags; index of the first flagged input or -1."""
    cdef Py_ssize_t k, t
    for k in range(nk):
        for t in range(1, nt):
            tflags[k] |= tflags[t * nk + k]
    for k in range(nk):
        if tflags[k] & NONFINITE:
            return <int>k
    return -1


def mag_range(
    list xs,
    object base,
    const uint32_t[:, ::1] lo,
    const uint32_t[:, ::1] hi,
    const cnp.int32_t[:, ::1] shift,
    const cnp.uint8_t[:, ::1] active,
    cnp.uint64_t[:, ::1] above,
    cnp.uint64_t[:, :, ::1] hist,
    int threads=0,
):
    """Count magnitudes ``u = bits(|x_k - b|_f32)`` against R target ranges per input.

    For every input k and target r with ``active[k, r]``: ``above[k, r] += #{u > hi[k, r]}``
    and, for ``lo <= u <= hi``, ``hist[k, r, (u - lo) >> shift[k, r]] += 1``. All
    arrays are (N, R) and ``hist`` (N, R, nbins); the caller makes sure the
    shifted range fits ``nbins``. Returns the index of the first input with NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        return -1
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef Py_ssize_t R = lo.shape[1]
    cdef Py_ssize_t nbins = hist.shape[2]
    cdef Py_ssize_t k, r, j, t
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    if (hi.shape[0] != nk or hi.shape[1] != R or shift.shape[0] != nk or shift.shape[1] != R
            or active.shape[0] != nk or active.shape[1] != R or above.shape[0] != nk or above.shape[1] != R):
        raise ValueError("lo, hi, shift, active and above must have shape (N, R)")
    if lo.shape[0] != nk or hist.shape[0] != nk or hist.shape[1] != R or nbins < 1:
        raise ValueError("lo must be (N, R) and hist (N, R, nbins)")
    if n >= <Py_ssize_t>0xFFFFFFFF:
        raise ValueError("at most 2^32 - 1 elements per call (per-thread counts are 32-bit)")
    for k in range(nk):
        for r in range(R):
            if active[k, r] and (shift[k, r] < 0 or shift[k, r] > 31
                                 or ((hi[k, r] - lo[k, r]) >> shift[k, r]) >= <uint32_t>nbins
                                 or hi[k, r] < lo[k, r]):
                raise ValueError(f"target ({k}, {r}): range does not fit {nbins} bins")
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef uint64_t* ab = <uint64_t*>calloc(nt * nk * R, sizeof(uint64_t))
    cdef uint32_t* hb = <uint32_t*>calloc(nt * nk * R * nbins, sizeof(uint32_t))
    cdef uint32_t* fl = <uint32_t*>calloc(nt * nk, sizeof(uint32_t))
    if ab == NULL or hb == NULL or fl == NULL:
        free(ab); free(hb); free(fl)
        raise MemoryError()
    try:
        if n:
            with nogil:
                mm_mag_range_par(
                    ptrs.p, b, nk, R, n, &lo[0, 0], &hi[0, 0], <const int32_t*>&shift[0, 0],
                    <const uint8_t*>&active[0, 0], nbins, ab, hb, fl, nt, grain,
                )
                for t in range(nt):
                    for k in range(nk):
                        for r in range(R):
                            above[k, r] += ab[(t * nk + k) * R + r]
                            if active[k, r]:
                                for j in range(nbins):
                                    hist[k, r, j] += hb[((t * nk + k) * R + r) * nbins + j]
        return _first_bad(fl, nk, nt)
    finally:
        free(ab); free(hb); free(fl)


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
    int threads=0,
):
    """See the module docstring. ``keys`` is None (no random drop) or uint64 (N,).

    ``start`` is the global index of ``out[0]`` inside the tensor (for the PRNG).
    ``threads`` 0 means :func:`meshmerge.cext.threads.get_threads` (no effect on the bytes).
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
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef double* vals = <double*>malloc(nt * nk * BLOCK * sizeof(double))
    cdef uint32_t* flags = <uint32_t*>calloc(nt * nk, sizeof(uint32_t))
    if vals == NULL or flags == NULL:
        free(vals); free(flags)
        raise MemoryError()
    try:
        if n:
            with nogil:
                mm_sparse_merge_par(
                    ptrs.p, b, &w[0], &lo[0], &hi[0], kp, drop_thr, rescale, consensus, disjoint,
                    inv_den, lam, start, nk, n, &out[0], flags, vals, nt, grain,
                )
        return _first_bad(flags, nk, nt)
    finally:
        free(vals)
        free(flags)
