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
``mag_range`` (a count above a range plus a histogram inside it, or copies of the
values inside it, which ``mag_select`` then selects from): O(n) time per pass,
O(bins) or O(copies) extra memory per contributor, no sort.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from libc.stdint cimport int32_t, uint8_t

from meshmerge.cext._common cimport first_nonfinite, gather_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"
    #define MM_SPARSE_BLOCK 512
    /* Elements ahead of the current block that each input's next lines are requested
       from (into L2): N + 1 interleaved short streams are followed badly by the hardware
       prefetchers. A hint only; it changes no value. */
    #define MM_SPARSE_AHEAD (2 * MM_SPARSE_BLOCK)
    static inline void mm_prefetch_block(const float *x, Py_ssize_t i0, Py_ssize_t hi0)
    {
        Py_ssize_t a = i0 + MM_SPARSE_AHEAD, e = a + MM_SPARSE_BLOCK < hi0 ? a + MM_SPARSE_BLOCK : hi0;
        for (; a < e; a += 16) __builtin_prefetch(x + a, 0, 2);
    }

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
            if (b != NULL) mm_prefetch_block(b, i0, hi0);
            for (Py_ssize_t j = 0; j < m; j++) {
                bb[j] = b == NULL ? 0.0 : (double)b[i0 + j];
                s[j] = 0.0; num[j] = 0.0; den[j] = 0.0;
            }
            if (keys == NULL && consensus == 0) {
                /* No drop mask and no election: nothing needs every v_k of an element
                   before the sums, so each value is added as it is made (the same
                   operations in the same order as the general path below, without the
                   round trip through vals). */
                for (Py_ssize_t k = 0; k < nk; k++) {
                    const float *x = p[k] + i0;
                    const float lok = lo[k], hik = hi[k];
                    const double wk = w[k];
                    uint32_t f = 0;
                    mm_prefetch_block(p[k], i0, hi0);
                    if (!disjoint) {
                        for (Py_ssize_t j = 0; j < m; j++) {
                            f |= mm_nonfinite_bits(x[j]);
                            double t = (double)x[j] - bb[j];
                            float a = (float)fabs(t);
                            double v = (t * rescale) * (double)((a >= lok) & (a < hik));
                            num[j] = num[j] + wk * v;
                        }
                    } else {
                        for (Py_ssize_t j = 0; j < m; j++) {
                            f |= mm_nonfinite_bits(x[j]);
                            double t = (double)x[j] - bb[j];
                            float a = (float)fabs(t);
                            double v = (t * rescale) * (double)((a >= lok) & (a < hik));
                            num[j] = num[j] + wk * v;
                            den[j] = den[j] + wk * (double)(v != 0.0);
                        }
                    }
                    flags[k] |= f;
                }
                goto finish;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = p[k] + i0;
                double *vk = vals + k * MM_SPARSE_BLOCK;
                mm_prefetch_block(p[k], i0, hi0);
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
        finish:
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
    #define MM_MAG_AHEAD 1024
    /* Candidate copies per (contributor, target) a thread gathers before it moves them
       to the shared buffer (one atomic reservation per MM_CAND_T hits). */
    #define MM_CAND_T 2048

    /* Where the in-range bit patterns go: target kr owns cand[off[kr] .. off[kr] + cap[kr]);
       fill[kr] counts every in-range element seen (also past cap: fill > cap = overflow,
       the copies are then incomplete and unused). NULL = counting only. */
    typedef struct {
        uint32_t *cand;
        const uint64_t *off;
        const uint64_t *cap;
        uint64_t *fill;
    } mm_cand_t;

    /* Move thread-local copies tb[0 .. *tn) of target kr to the shared buffer. The order
       in which threads reserve their slots is not fixed, so only the multiset of the
       buffer is: the selection made from it does not depend on the order. */
    static inline void mm_cand_flush(const mm_cand_t *cs, Py_ssize_t kr, const uint32_t *tb, uint32_t *tn)
    {
        uint64_t c = *tn, cap = cs->cap[kr];
        *tn = 0;
        if (c == 0) return;
        uint64_t at = __atomic_fetch_add(&cs->fill[kr], c, __ATOMIC_RELAXED);
        if (at >= cap) return;
        if (c > cap - at) c = cap - at;
        memcpy(cs->cand + cs->off[kr] + at, tb, (size_t)c * sizeof(uint32_t));
    }

    /* One target's sweep over a block of magnitudes u[0 .. m): returns #{u > h} in *above
       and copies the u in [l, h] to hits (in order; hits needs m + 16 entries), returning
       how many. Moves and compares bits only, so every variant gives the same result. */
    static inline Py_ssize_t mm_range_scalar(const uint32_t *u, Py_ssize_t m, uint32_t l, uint32_t h,
                                             uint32_t *hits, uint32_t *above)
    {
        const uint32_t span = h - l;
        uint32_t cnt = 0, nin = 0;
        /* One vectorised sweep counts both; the copy only runs where the block has hits. */
        for (Py_ssize_t j = 0; j < m; j++) {
            cnt += (uint32_t)(u[j] > h);
            nin += (uint32_t)(u[j] - l <= span);
        }
        *above = cnt;
        if (!nin) return 0;
        /* Branch-free compaction (a conditional increment in one loop gets vectorised
           into a masked scatter, which is many times slower on some CPUs). */
        Py_ssize_t c = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            hits[c] = u[j];
            c += (Py_ssize_t)(u[j] - l <= span);
        }
        return c;
    }

    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    #include <immintrin.h>
    #define MM_HAVE_AVX512_RANGE 1
    /* AVX-512 version: mask compares and a register-form compress per 16 lanes (the
       memory form of vpcompressd is microcoded and slow on some CPUs). */
    __attribute__((target("avx512f,popcnt")))
    static Py_ssize_t mm_range_avx512(const uint32_t *u, Py_ssize_t m, uint32_t l, uint32_t h,
                                      uint32_t *hits, uint32_t *above)
    {
        const __m512i vl = _mm512_set1_epi32((int)l), vs = _mm512_set1_epi32((int)(h - l));
        const __m512i vh = _mm512_set1_epi32((int)h);
        Py_ssize_t c = 0, j = 0;
        uint32_t cnt = 0;
        for (; j + 16 <= m; j += 16) {
            __m512i v = _mm512_loadu_si512((const void *)(u + j));
            __mmask16 gt = _mm512_cmpgt_epu32_mask(v, vh);
            __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(v, vl), vs);
            cnt += (uint32_t)__builtin_popcount((unsigned)gt);
            _mm512_storeu_si512((void *)(hits + c), _mm512_maskz_compress_epi32(in, v));
            c += __builtin_popcount((unsigned)in);
        }
        for (; j < m; j++) {
            cnt += (uint32_t)(u[j] > h);
            hits[c] = u[j];
            c += (Py_ssize_t)(u[j] - l <= h - l);
        }
        *above = cnt;
        return c;
    }
    static int mm_avx512_range = -1;
    static inline int mm_use_avx512_range(void)
    {
        if (mm_avx512_range < 0) {
            __builtin_cpu_init();
            mm_avx512_range = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt");
        }
        return mm_avx512_range;
    }
    static void mm_set_portable_range(int on) { mm_avx512_range = on ? 0 : -1; }
    #else
    #define MM_HAVE_AVX512_RANGE 0
    static void mm_set_portable_range(int on) { (void)on; }
    #endif

    /* Magnitude bit patterns u = bits(|x - b|_f32) (non-negative floats order like
       their bits). For every contributor k and active target r (slot kr = k * R + r):
       above[kr] += #{u > hi[kr]}, and for lo[kr] <= u <= hi[kr]:
       hist[kr * nbins + ((u - lo[kr]) >> shift[kr])] += 1, or for a target with copies
       (cs->cap[kr] != 0) a copy of u instead (via the thread's tb / tn). Elements [lo0, hi0). */
    MM_CLONES static void mm_mag_range(
        const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t lo0, Py_ssize_t hi0,
        const uint32_t *lo, const uint32_t *hi, const int32_t *shift, const uint8_t *active,
        Py_ssize_t nbins, uint64_t *above, uint32_t *hist, uint32_t *flags,
        const mm_cand_t *cs, uint32_t *tb, uint32_t *tn)
    {
        uint32_t u[MM_MAG_BLOCK], hits[MM_MAG_BLOCK + 16];
    #if MM_HAVE_AVX512_RANGE
        const int wide = mm_use_avx512_range();
    #endif
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
                /* The next input's span is where the stream goes after this one: ask for
                   its lines while this span is swept, MM_MAG_AHEAD elements ahead of the
                   read position (a hint only; it changes no value). */
                const float *nx = k + 1 < nk ? p[k + 1] : NULL;
                for (Py_ssize_t i0 = s0; i0 < s1; i0 += MM_MAG_BLOCK) {
                    Py_ssize_t m = s1 - i0 < MM_MAG_BLOCK ? s1 - i0 : MM_MAG_BLOCK;
                    Py_ssize_t ahead = i0 + MM_MAG_AHEAD;
                    if (ahead < s1) {
                        for (Py_ssize_t q = 0; q < MM_MAG_BLOCK && ahead + q < s1; q += 16)
                            __builtin_prefetch(x + ahead + q, 0, 2);
                    } else if (nx != NULL) {
                        Py_ssize_t a2 = s0 + (ahead - s1);
                        for (Py_ssize_t q = 0; q < MM_MAG_BLOCK && a2 + q < s1; q += 16)
                            __builtin_prefetch(nx + a2 + q, 0, 2);
                    }
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
                        const uint32_t l = lo[kr], h = hi[kr];
                        /* A target with copies keeps the in-range values instead of a
                           histogram (the selection needs nothing else); the hits go straight
                           into the thread's copy buffer, which always has room for a block. */
                        const int copy = cs != NULL && cs->cap[kr] != 0;
                        uint32_t *dst = hits;
                        if (copy) {
                            uint32_t *tk = tb + kr * MM_CAND_T;
                            if (tn[kr] + MM_MAG_BLOCK + 16 > MM_CAND_T) mm_cand_flush(cs, kr, tk, &tn[kr]);
                            dst = tk + tn[kr];
                        }
                        uint32_t cnt;
                        Py_ssize_t c;
    #if MM_HAVE_AVX512_RANGE
                        if (wide) c = mm_range_avx512(u, m, l, h, dst, &cnt);
                        else
    #endif
                        c = mm_range_scalar(u, m, l, h, dst, &cnt);
                        above[kr] += cnt;
                        if (copy) {
                            tn[kr] += (uint32_t)c;
                        } else {
                            uint32_t *hk = hist + kr * nbins;
                            const int sh = shift[kr];
                            for (Py_ssize_t q = 0; q < c; q++) hk[(dst[q] - l) >> sh]++;
                        }
                    }
                }
                flags[k] |= f;
            }
        }
    }

    /* Thread t adds into above + t * nk * R, hist + t * nk * R * nbins, tflags + t * nk
       and gathers copies in tbuf + t * nk * R * MM_CAND_T (counts tcnt + t * nk * R,
       zeroed by the caller); what is left in them is flushed after the loop. */
    static void mm_mag_range_par(
        const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t n,
        const uint32_t *tlo, const uint32_t *thi, const int32_t *shift, const uint8_t *active,
        Py_ssize_t nbins, uint64_t *above, uint32_t *hist, uint32_t *tflags,
        const mm_cand_t *cs, uint32_t *tbuf, uint32_t *tcnt, int nt, Py_ssize_t grain)
    {
        const Py_ssize_t nkr = nk * R;
    #if MM_HAVE_AVX512_RANGE
        (void)mm_use_avx512_range();  /* decided once, before any thread reads it */
    #endif
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_mag_range(p, b, nk, R, lo, hi, tlo, thi, shift, active, nbins,
                         above + (Py_ssize_t)tid * nkr, hist + (Py_ssize_t)tid * nkr * nbins,
                         tflags + (Py_ssize_t)tid * nk, cs,
                         cs == NULL ? NULL : tbuf + (Py_ssize_t)tid * nkr * MM_CAND_T,
                         cs == NULL ? NULL : tcnt + (Py_ssize_t)tid * nkr);
        });
        if (cs == NULL) return;
        for (int t = 0; t < nt; t++)
            for (Py_ssize_t kr = 0; kr < nkr; kr++)
                mm_cand_flush(cs, kr, tbuf + ((Py_ssize_t)t * nkr + kr) * MM_CAND_T, &tcnt[(Py_ssize_t)t * nkr + kr]);
    }

    /* The need-th largest (need >= 1) of the values of buf[0 .. n) that lie in [lo, hi],
       which must hold at least `need` of them. The values in range are first copied to
       `scratch` (n entries); then radix rounds: histogram the current range into nbins
       bins (`bins`, nbins entries), keep the bin holding the wanted rank, repeat until the
       range is one value. Linear in n per round, at most 32 / log2(nbins) + 1 rounds, no
       comparison sort (so no input makes it quadratic). */
    static int mm_select_desc(const uint32_t *buf, Py_ssize_t n, uint32_t lo, uint32_t hi,
                              uint64_t need, uint32_t *scratch, uint64_t *bins, Py_ssize_t nbins,
                              uint32_t *out)
    {
        Py_ssize_t c = 0;
        const uint32_t span0 = hi - lo;
        for (Py_ssize_t i = 0; i < n; i++) {
            scratch[c] = buf[i];
            c += (Py_ssize_t)(buf[i] - lo <= span0);
        }
        if (need == 0 || (uint64_t)c < need) return 0;
        while (lo < hi) {
            int sh = 0;
            while (((uint64_t)(hi - lo) >> sh) >= (uint64_t)nbins) sh++;
            memset(bins, 0, (size_t)nbins * sizeof(uint64_t));
            for (Py_ssize_t i = 0; i < c; i++) bins[(scratch[i] - lo) >> sh]++;
            Py_ssize_t top = (Py_ssize_t)((uint64_t)(hi - lo) >> sh);
            uint64_t seen = 0;
            Py_ssize_t bi = top;
            while (bi > 0 && seen + bins[bi] < need) { seen += bins[bi]; bi--; }
            need -= seen;
            uint32_t nlo = lo + ((uint32_t)bi << sh);
            uint32_t nhi = sh == 0 ? nlo : nlo + ((1u << sh) - 1u);
            if (nhi > hi || nhi < nlo) nhi = hi;
            Py_ssize_t d = 0;
            const uint32_t span = nhi - nlo;
            for (Py_ssize_t i = 0; i < c; i++) {
                uint32_t v = scratch[i];
                scratch[d] = v;
                d += (Py_ssize_t)(v - nlo <= span);
            }
            c = d;
            lo = nlo;
            hi = nhi;
        }
        *out = lo;
        return 1;
    }
    """
    void mm_sparse_merge_par(
        const float** p, const float* b, const double* w, const float* lo, const float* hi,
        const uint64_t* keys, uint64_t drop_thr, double rescale, int consensus, int disjoint,
        double inv_den, double lam, uint64_t start, Py_ssize_t nk, Py_ssize_t n,
        float* out, uint32_t* tflags, double* vals, int nt, Py_ssize_t grain) nogil
    ctypedef struct mm_cand_t:
        uint32_t* cand
        const uint64_t* off
        const uint64_t* cap
        uint64_t* fill
    enum: MM_CAND_T
    void mm_mag_range_par(
        const float** p, const float* b, Py_ssize_t nk, Py_ssize_t R, Py_ssize_t n,
        const uint32_t* tlo, const uint32_t* thi, const int32_t* shift, const uint8_t* active,
        Py_ssize_t nbins, uint64_t* above, uint32_t* hist, uint32_t* tflags,
        const mm_cand_t* cs, uint32_t* tbuf, uint32_t* tcnt, int nt, Py_ssize_t grain) nogil
    int mm_select_desc(const uint32_t* buf, Py_ssize_t n, uint32_t lo, uint32_t hi,
                       uint64_t need, uint32_t* scratch, uint64_t* bins, Py_ssize_t nbins,
                       uint32_t* out) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil
    void mm_set_portable_range(int on)


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
    object cand=None,
    object cand_off=None,
    object cand_cap=None,
    object cand_fill=None,
):
    """Count magnitudes ``u = bits(|x_k - b|_f32)`` against R target ranges per input.

    For every input k and target r with ``active[k, r]``: ``above[k, r] += #{u > hi[k, r]}``
    and, for ``lo <= u <= hi``, ``hist[k, r, (u - lo) >> shift[k, r]] += 1``. All
    arrays are (N, R) and ``hist`` (N, R, nbins); the caller makes sure the
    shifted range fits ``nbins``. Returns the index of the first input with NaN/Inf, or -1.

    With ``cand`` (uint32, 1-D) and the (N, R) uint64 arrays ``cand_off``, ``cand_cap``,
    ``cand_fill``, a target with ``cap`` > 0 gets no histogram; instead every in-range
    ``u`` is copied into
    ``cand[off + fill : off + cap]`` and ``fill`` counts them all (calls add on): while
    ``fill <= cap`` the slice ``cand[off : off + fill]`` holds exactly the in-range
    values seen so far, in no particular order; ``fill > cap`` means the copies are
    incomplete. ``cap`` 0 copies nothing for that target.
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
    cdef uint32_t[::1] cv
    cdef const cnp.uint64_t[:, ::1] ov
    cdef const cnp.uint64_t[:, ::1] capv
    cdef cnp.uint64_t[:, ::1] fv
    cdef mm_cand_t cs
    cdef mm_cand_t* csp = NULL
    cdef uint32_t* tbuf = NULL
    cdef uint32_t* tcnt = NULL
    if cand is not None:
        if cand_off is None or cand_cap is None or cand_fill is None:
            raise ValueError("cand needs cand_off, cand_cap and cand_fill")
        cv = cand
        ov = cand_off
        capv = cand_cap
        fv = cand_fill
        if (ov.shape[0] != nk or ov.shape[1] != R or capv.shape[0] != nk or capv.shape[1] != R
                or fv.shape[0] != nk or fv.shape[1] != R):
            raise ValueError("cand_off, cand_cap and cand_fill must have shape (N, R)")
        for k in range(nk):
            for r in range(R):
                if capv[k, r] and (ov[k, r] > <uint64_t>cv.shape[0] or capv[k, r] > <uint64_t>cv.shape[0] - ov[k, r]):
                    raise ValueError(f"target ({k}, {r}): cand_off + cand_cap exceeds len(cand)")
        cs.cand = &cv[0] if cv.shape[0] else NULL
        cs.off = <const uint64_t*>&ov[0, 0]
        cs.cap = <const uint64_t*>&capv[0, 0]
        cs.fill = <uint64_t*>&fv[0, 0]
        csp = &cs
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef uint64_t* ab = <uint64_t*>calloc(nt * nk * R, sizeof(uint64_t))
    cdef uint32_t* hb = <uint32_t*>calloc(nt * nk * R * nbins, sizeof(uint32_t))
    cdef uint32_t* fl = <uint32_t*>calloc(nt * nk, sizeof(uint32_t))
    if csp != NULL:
        tbuf = <uint32_t*>malloc(max(nt * nk * R * MM_CAND_T, 1) * sizeof(uint32_t))
        tcnt = <uint32_t*>calloc(max(nt * nk * R, 1), sizeof(uint32_t))
    if ab == NULL or hb == NULL or fl == NULL or (csp != NULL and (tbuf == NULL or tcnt == NULL)):
        free(ab); free(hb); free(fl); free(tbuf); free(tcnt)
        raise MemoryError()
    try:
        if n:
            with nogil:
                mm_mag_range_par(
                    ptrs.p, b, nk, R, n, &lo[0, 0], &hi[0, 0], <const int32_t*>&shift[0, 0],
                    <const uint8_t*>&active[0, 0], nbins, ab, hb, fl, csp, tbuf, tcnt, nt, grain,
                )
                for t in range(nt):
                    for k in range(nk):
                        for r in range(R):
                            above[k, r] += ab[(t * nk + k) * R + r]
                            if active[k, r]:
                                for j in range(nbins):
                                    hist[k, r, j] += hb[((t * nk + k) * R + r) * nbins + j]
        return first_nonfinite(fl, nk, nt)
    finally:
        free(ab); free(hb); free(fl); free(tbuf); free(tcnt)


def use_portable_sweep(bint portable):
    """Tests: make ``mag_range`` use its portable sweep (True) or pick by CPU again (False).

    Both give the same counts and copies; this lets one machine test both."""
    mm_set_portable_range(portable)


def mag_select(const uint32_t[::1] values, uint32_t lo, uint32_t hi, uint64_t need):
    """The ``need``-th largest (1 = largest) of the ``values`` that lie in ``[lo, hi]``.

    Exact radix selection (counting rounds of 2048 bins, no comparison sort, linear
    time per round whatever the values). Raises ValueError if fewer than ``need``
    values (or none, or ``need`` 0) are in range.
    """
    cdef Py_ssize_t n = values.shape[0]
    if hi < lo:
        raise ValueError("hi must be >= lo")
    cdef uint32_t* scratch = <uint32_t*>malloc(max(n, 1) * sizeof(uint32_t))
    cdef uint64_t* bins = <uint64_t*>malloc(2048 * sizeof(uint64_t))
    cdef uint32_t out = 0
    cdef int ok = 0
    if scratch == NULL or bins == NULL:
        free(scratch); free(bins)
        raise MemoryError()
    try:
        if n:
            with nogil:
                ok = mm_select_desc(&values[0], n, lo, hi, need, scratch, bins, 2048, &out)
        if not ok:
            raise ValueError(f"fewer than need={need} values in [{lo}, {hi}]")
        return out
    finally:
        free(scratch); free(bins)


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
        return first_nonfinite(flags, nk, nt)
    finally:
        free(vals)
        free(flags)
