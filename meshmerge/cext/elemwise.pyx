# cython: language_level=3
"""Kernels for DELLA, the EMR elect step and Fisher-weighted averaging.

They perform exactly the float64 operations, in exactly the order, of the
numpy formulations documented in :mod:`meshmerge.crdt.strategies.elementwise`
and :mod:`meshmerge.crdt.strategies.fisher` (each ``+ - * /`` exactly rounded,
no contraction, sums over contributors k = 0..N-1), so the bytes are the ones
those definitions give, for any chunking and thread count.

DELLA ranks the magnitudes of each row with a stable LSD radix sort on the
float64 bit patterns (non-negative doubles order like their bits), which gives
the same ranks as a stable argsort, ties broken by position, in O(cols) per row.
"""

import numpy as np
cimport numpy as cnp
from libc.stdlib cimport calloc, free, malloc
from libc.stdint cimport uint32_t, uint64_t

from meshmerge.cext._common cimport NONFINITE, first_nonfinite, gather_new_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()


cdef extern from *:
    """
    #include <float.h>
    #include <math.h>
    #include <stdlib.h>
    #include "mm_par.h"

    /* Same definition as splitmix64_at in _common.pxd and the lanes of prng.drop_lanes. */
    static inline uint64_t mm_sm64_at(uint64_t key, uint64_t index)
    {
        uint64_t z = key + (index + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    static inline double mm_task(const float *x, const float *b, Py_ssize_t j)
    {
        return b != NULL ? (double)x[j] - (double)b[j] : (double)x[j];
    }

    /* Stable LSD radix sort of (k, ix)[0..m) by `passes` digits of `dbits` bits of k,
       from bit 0. Ends with the sorted data in k/ix (tk/ti are
       scratch). A digit that is the same for every key costs no scatter. */
    static void mm_lsd(uint64_t *k, uint32_t *ix, uint64_t *tk, uint32_t *ti, Py_ssize_t m, int passes,
                       int dbits, uint32_t *hist)
    {
        const uint32_t bins = 1u << dbits, mask = bins - 1;
        uint64_t *k0 = k;
        uint32_t *i0 = ix;
        memset(hist, 0, sizeof(uint32_t) * (size_t)passes * bins);
        for (Py_ssize_t j = 0; j < m; j++) {
            uint64_t v = k[j];
            for (int d = 0; d < passes; d++) hist[d * bins + ((v >> (dbits * d)) & mask)]++;
        }
        for (int d = 0; d < passes; d++) {
            uint32_t *h = hist + d * bins;
            int single = 0;
            for (uint32_t v = 0; v < bins; v++) if (h[v] == (uint32_t)m) { single = 1; break; }
            if (single) continue;
            uint32_t pos = 0;
            for (uint32_t v = 0; v < bins; v++) { uint32_t c = h[v]; h[v] = pos; pos += c; }
            const int sh = dbits * d;
            for (Py_ssize_t j = 0; j < m; j++) {
                uint64_t v = k[j];
                uint32_t p = h[(v >> sh) & mask]++;
                tk[p] = v;
                ti[p] = ix[j];
            }
            uint64_t *sk = k; k = tk; tk = sk;
            uint32_t *si = ix; ix = ti; ti = si;
        }
        if (k != k0) {
            memcpy(k0, k, sizeof(uint64_t) * (size_t)m);
            memcpy(i0, ix, sizeof(uint32_t) * (size_t)m);
        }
    }

    /* Stable ranks (0 = smallest) of keys[0..m), ties by position: keys are reduced
       order-preservingly to (key - min) >> tz, tz the trailing zero bits they all
       share (float32-derived magnitudes have many), then radix sorted. Large rows: one
       most-significant 11-bit pass spreads them into buckets that fit in cache, each
       then sorted LSD by the remaining bits (8-bit digits); small rows: LSD with
       11-bit digits. Every pass is stable, so equal keys keep their order.
       idx/tmp_i/tmp_k are scratch; hist holds 6 * 2048 counters. */
    #define MM_RADIX_BINS 2048
    #define MM_RADIX_PASSES 6
    #define MM_MSD_FROM 65536
    static void mm_stable_ranks(uint64_t *keys, uint32_t *idx, uint64_t *tmp_k, uint32_t *tmp_i,
                                uint32_t *rank, Py_ssize_t m, uint32_t *hist)
    {
        uint64_t lo = UINT64_MAX, any = 0;
        for (Py_ssize_t j = 0; j < m; j++) lo = keys[j] < lo ? keys[j] : lo;
        for (Py_ssize_t j = 0; j < m; j++) { keys[j] -= lo; any |= keys[j]; }
        for (Py_ssize_t j = 0; j < m; j++) idx[j] = (uint32_t)j;
        if (any != 0) {
            int tz = __builtin_ctzll(any);
            int bits = 64 - __builtin_clzll(any >> tz);
            for (Py_ssize_t j = 0; j < m; j++) keys[j] >>= tz;
            if (m < MM_MSD_FROM || bits <= 11) {
                mm_lsd(keys, idx, tmp_k, tmp_i, m, (bits + 10) / 11, 11, hist);
            } else {
                const int sh = bits - 11;
                const uint64_t low = (1ULL << sh) - 1;
                uint32_t *h = hist;
                memset(h, 0, sizeof(uint32_t) * MM_RADIX_BINS);
                for (Py_ssize_t j = 0; j < m; j++) h[keys[j] >> sh]++;
                uint32_t start[MM_RADIX_BINS + 1], pos = 0;
                for (int v = 0; v < MM_RADIX_BINS; v++) { start[v] = pos; pos += h[v]; h[v] = start[v]; }
                start[MM_RADIX_BINS] = pos;
                for (Py_ssize_t j = 0; j < m; j++) {
                    uint32_t p = h[keys[j] >> sh]++;
                    tmp_k[p] = keys[j] & low;
                    tmp_i[p] = idx[j];
                }
                for (int v = 0; v < MM_RADIX_BINS; v++) {
                    Py_ssize_t s0 = start[v], c = start[v + 1] - start[v];
                    if (c > 1)
                        mm_lsd(tmp_k + s0, tmp_i + s0, keys + s0, idx + s0, c, (sh + 7) / 8, 8,
                               hist + MM_RADIX_BINS);
                }
                idx = tmp_i;
            }
        }
        for (Py_ssize_t p = 0; p < m; p++) rank[idx[p]] = (uint32_t)p;
    }

    /* Phase 1: thr[k*n + e] = round(p * 65536) for every (row, contributor) pair,
       p = clip(density + epsilon * (rank * (2 / (cols - 1)) - 1), 0, 1). */
    static int mm_della_thresholds(const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t rows,
                                   Py_ssize_t cols, double density, double epsilon, uint32_t *thr, int nt)
    {
        Py_ssize_t n = rows * cols;
        Py_ssize_t tasks = rows * nk;
        const double step = cols > 1 ? 2.0 / (double)(cols - 1) : 0.0;
        int failed = 0;
        if (cols == 1) {
            uint32_t t0 = (uint32_t)nearbyint(density * 65536.0);
            for (Py_ssize_t i = 0; i < nk * n; i++) thr[i] = t0;
            return 0;
        }
        #pragma omp parallel num_threads(nt) if(nt > 1 && tasks > 1)
        {
            uint64_t *keys = malloc(sizeof(uint64_t) * 2 * (size_t)cols);
            uint32_t *ib = malloc(sizeof(uint32_t) * 3 * (size_t)cols);
            uint32_t *hist = malloc(sizeof(uint32_t) * MM_RADIX_PASSES * MM_RADIX_BINS);
            int ok = keys != NULL && ib != NULL && hist != NULL;
            /* Every thread must reach the worksharing loop; one without scratch only flags. */
            #pragma omp for schedule(dynamic, 1)
            for (Py_ssize_t q = 0; q < tasks; q++) {
                if (!ok) {
                    #pragma omp atomic write
                    failed = 1;
                } else {
                    Py_ssize_t r = q / nk, k = q % nk, lo = r * cols;
                    const float *x = xs[k] + lo;
                    const float *bb = b != NULL ? b + lo : NULL;
                    for (Py_ssize_t j = 0; j < cols; j++) {
                        double a = fabs(mm_task(x, bb, j));
                        memcpy(&keys[j], &a, 8);
                    }
                    uint32_t *rank = ib + 2 * cols;
                    mm_stable_ranks(keys, ib, keys + cols, ib + cols, rank, cols, hist);
                    uint32_t *out = thr + k * n + lo;
                    for (Py_ssize_t j = 0; j < cols; j++) {
                        double frac = (double)rank[j] * step - 1.0;
                        double p = density + epsilon * frac;
                        p = p < 0.0 ? 0.0 : (p > 1.0 ? 1.0 : p);
                        out[j] = (uint32_t)nearbyint(p * 65536.0);
                    }
                }
            }
            free(keys); free(ib); free(hist);
        }
        return failed;
    }

    /* Phase 2, elements [lo0, hi0) of the chunk (global offset g0): drop/rescale with the
       thresholds, then TIES sign election + disjoint mean (consensus 1 = total,
       2 = count) or the weighted sum times inv_total (consensus 0). Blocks of
       MM_DELLA_BLOCK elements, contributor-major inside a block so the inner loops
       vectorise; every element still sums over k = 0..N-1 in order.
       Scratch: (nk + 3) * MM_DELLA_BLOCK doubles. */
    #define MM_DELLA_BLOCK 512
    MM_CLONES static void mm_della_combine(const float *const *xs, const float *b, const double *w,
                                           const uint64_t *keys, const uint32_t *thr, Py_ssize_t nk,
                                           Py_ssize_t n, uint64_t g0, Py_ssize_t lo0, Py_ssize_t hi0,
                                           int consensus, double inv_total, double scaling, float *out,
                                           double *scratch)
    {
        double *s = scratch, *num = scratch + MM_DELLA_BLOCK, *den = scratch + 2 * MM_DELLA_BLOCK;
        double *vb = scratch + 3 * MM_DELLA_BLOCK;
        int32_t lanes[MM_DELLA_BLOCK + 8];
        for (Py_ssize_t lo = lo0; lo < hi0; lo += MM_DELLA_BLOCK) {
            Py_ssize_t m = hi0 - lo < MM_DELLA_BLOCK ? hi0 - lo : MM_DELLA_BLOCK;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + lo;
                const uint32_t *tk = thr + k * n + lo;
                const uint64_t gl = g0 + (uint64_t)lo;
                /* The 16-bit lanes of elements gl.., four per draw (as prng.drop_lanes). */
                const uint64_t d0 = gl >> 2;
                const Py_ssize_t off = (Py_ssize_t)(gl & 3), nd = (off + m + 3) >> 2;
                for (Py_ssize_t i = 0; i < nd; i++) {
                    uint64_t r = mm_sm64_at(keys[k], d0 + (uint64_t)i);
                    lanes[4 * i] = (int32_t)(r & 0xFFFF);
                    lanes[4 * i + 1] = (int32_t)((r >> 16) & 0xFFFF);
                    lanes[4 * i + 2] = (int32_t)((r >> 32) & 0xFFFF);
                    lanes[4 * i + 3] = (int32_t)(r >> 48);
                }
                const int32_t *ln = lanes + off;
                double *v = vb + k * MM_DELLA_BLOCK;
                /* Two loops: the division runs for every entry (no branch around it), so
                   both vectorise; dropped entries are zeroed after. */
                if (b != NULL) {
                    const float *bp = b + lo;
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double th = (double)(int32_t)tk[j];
                        double sc = th * 0x1p-16;  /* == th / 65536 exactly (th integer) */
                        v[j] = ((double)x[j] - (double)bp[j]) / (th > 0.0 ? sc : 1.0);
                    }
                } else {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double th = (double)(int32_t)tk[j];
                        double sc = th * 0x1p-16;
                        v[j] = (double)x[j] / (th > 0.0 ? sc : 1.0);
                    }
                }
                for (Py_ssize_t j = 0; j < m; j++) v[j] = ln[j] < (int32_t)tk[j] ? v[j] : 0.0;
            }
            if (consensus) {
                for (Py_ssize_t j = 0; j < m; j++) { s[j] = 0.0; num[j] = 0.0; den[j] = 0.0; }
                for (Py_ssize_t k = 0; k < nk; k++) {
                    const double *v = vb + k * MM_DELLA_BLOCK;
                    const double wk = w[k];
                    if (consensus == 1) {
                        for (Py_ssize_t j = 0; j < m; j++) s[j] = s[j] + wk * v[j];
                    } else {
                        for (Py_ssize_t j = 0; j < m; j++)
                            s[j] = s[j] + (double)((v[j] > 0.0) - (v[j] < 0.0));
                    }
                }
                for (Py_ssize_t k = 0; k < nk; k++) {
                    const double *v = vb + k * MM_DELLA_BLOCK;
                    const double wk = w[k];
                    for (Py_ssize_t j = 0; j < m; j++) {
                        /* & and |, not && and ||: no branches, so the loop vectorises */
                        int agree = ((v[j] > 0.0) & (s[j] > 0.0)) | ((v[j] < 0.0) & (s[j] < 0.0));
                        num[j] = num[j] + (agree ? wk * v[j] : 0.0);
                        den[j] = den[j] + (agree ? wk : 0.0);
                    }
                }
                for (Py_ssize_t j = 0; j < m; j++) num[j] = num[j] / (den[j] == 0.0 ? 1.0 : den[j]);
            } else {
                for (Py_ssize_t j = 0; j < m; j++) num[j] = 0.0;
                for (Py_ssize_t k = 0; k < nk; k++) {
                    const double *v = vb + k * MM_DELLA_BLOCK;
                    const double wk = w[k];
                    for (Py_ssize_t j = 0; j < m; j++) num[j] = num[j] + wk * v[j];
                }
                for (Py_ssize_t j = 0; j < m; j++) num[j] = num[j] * inv_total;
            }
            if (b != NULL) {
                for (Py_ssize_t j = 0; j < m; j++) out[lo + j] = (float)((double)b[lo + j] + scaling * num[j]);
            } else {
                for (Py_ssize_t j = 0; j < m; j++) out[lo + j] = (float)(0.0 + scaling * num[j]);
            }
        }
    }

    static int mm_della_combine_par(const float *const *xs, const float *b, const double *w,
                                    const uint64_t *keys, const uint32_t *thr, Py_ssize_t nk, Py_ssize_t n,
                                    uint64_t g0, int consensus, double inv_total, double scaling, float *out,
                                    int nt, Py_ssize_t grain)
    {
        Py_ssize_t per = (nk + 3) * MM_DELLA_BLOCK;
        double *scratch = malloc(sizeof(double) * (size_t)(per * nt));
        if (scratch == NULL) return 1;
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_della_combine(xs, b, w, keys, thr, nk, n, g0, lo, hi, consensus, inv_total, scaling, out,
                             scratch + (Py_ssize_t)tid * per);
        });
        free(scratch);
        return 0;
    }

    /* bad gets bit 63 set iff the float64 a is NaN or Inf (integer-only, so it vectorises). */
    #define MM_FCHECK(a) do { uint64_t bits_; memcpy(&bits_, &(a), 8); \
                              bad |= (bits_ & 0x7FF0000000000000ULL) + 0x0010000000000000ULL; } while (0)

    /* EMR elect on elements [lo0, hi0): sign of sum_k t_k (float64, k = 0..N-1 in
       order), magnitude max |t_k| over entries of that sign, out = bb + scaling *
       (sign * mag). One sweep: t_k = fl(x_k - b) is monotone in x_k, so the largest
       positive t_k is fl(max_k x_k - b) and the most negative one fl(min_k x_k - b);
       the float32 extremes ride along with the sum. Blocks of MM_EMR_BLOCK elements
       keep the accumulators in L1 while four contributors stream through per sweep
       (per element the additions still run k = 0, 1, 2, ... in order, so the grouping
       changes no bit). bad[k] bit 31: x_k holds NaN/Inf; a non-finite x makes the
       block's sum non-finite (the base is checked by the caller), so only such
       blocks are rescanned. */
    #define MM_EMR_BLOCK 2048
    #define MM_EMR_STREAM_MIN ((Py_ssize_t)1 << 20)
    /* t_k of element j: (double)x - (double)b, or (double)x without a base. */
    #define MM_EMR_T(x, j) (has_base ? (double)(x)[j] - (double)bl[j] : (double)(x)[j])
    /* One block of m elements at `start` into row[0..m); inlined with a constant
       has_base, so each case gets its own loops (no conditional load to stop the
       vectoriser). */
    static inline __attribute__((always_inline)) void mm_emr_block(
        const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t start, Py_ssize_t m,
        double scaling, double *restrict tot, float *restrict xmax, float *restrict xmin,
        float *restrict row, const int has_base)
    {
        const float *bl = has_base ? b + start : NULL;
        for (Py_ssize_t j = 0; j < m; j++) { tot[j] = 0.0; xmax[j] = -FLT_MAX; xmin[j] = FLT_MAX; }
        Py_ssize_t k = 0;
        for (; k + 4 <= nk; k += 4) {
            const float *x0 = xs[k] + start, *x1 = xs[k + 1] + start;
            const float *x2 = xs[k + 2] + start, *x3 = xs[k + 3] + start;
            for (Py_ssize_t j = 0; j < m; j++)
                tot[j] = (((tot[j] + MM_EMR_T(x0, j)) + MM_EMR_T(x1, j)) + MM_EMR_T(x2, j)) + MM_EMR_T(x3, j);
        }
        for (; k < nk; k++) {
            const float *x0 = xs[k] + start;
            for (Py_ssize_t j = 0; j < m; j++) tot[j] = tot[j] + MM_EMR_T(x0, j);
        }
        for (k = 0; k < nk; k++) {
            const float *x0 = xs[k] + start;
            for (Py_ssize_t j = 0; j < m; j++) {
                float v = x0[j];
                xmax[j] = v > xmax[j] ? v : xmax[j];
                xmin[j] = v < xmin[j] ? v : xmin[j];
            }
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            /* Without a base, "+ 0.0" (which only turns -0.0 into +0.0, and both give
               mag 0) keeps GCC from rewriting the tests as float32 compares, which it
               then does not vectorise. */
            double tmax = has_base ? MM_EMR_T(xmax, j) : (double)xmax[j] + 0.0;
            double tmin = has_base ? MM_EMR_T(xmin, j) : (double)xmin[j] + 0.0, s = tot[j];
            double pos = tmax > 0.0 ? tmax : 0.0, neg = tmin < 0.0 ? -tmin : 0.0;
            double neg_or_0 = s < 0.0 ? neg : 0.0, minus_or_0 = s < 0.0 ? -1.0 : 0.0;
            double mag = s > 0.0 ? pos : neg_or_0, sign = s > 0.0 ? 1.0 : minus_or_0;
            if (has_base) row[j] = (float)((double)bl[j] + scaling * (sign * mag));
            else row[j] = (float)(0.0 + scaling * (sign * mag));
        }
    }
    #undef MM_EMR_T
    MM_CLONES static void mm_emr(const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t lo0,
                                 Py_ssize_t hi0, double scaling, float *out, uint32_t *bad_x, int stream)
    {
        double tot[MM_EMR_BLOCK];
        float xmax[MM_EMR_BLOCK], xmin[MM_EMR_BLOCK], row[MM_EMR_BLOCK];
        for (Py_ssize_t start = lo0; start < hi0; start += MM_EMR_BLOCK) {
            Py_ssize_t m = hi0 - start < MM_EMR_BLOCK ? hi0 - start : MM_EMR_BLOCK;
            if (b != NULL) mm_emr_block(xs, b, nk, start, m, scaling, tot, xmax, xmin, row, 1);
            else mm_emr_block(xs, b, nk, start, m, scaling, tot, xmax, xmin, row, 0);
            uint64_t bad = 0;
            for (Py_ssize_t j = 0; j < m; j++) MM_FCHECK(tot[j]);
            mm_put_f32(out + start, row, m, stream);
            if (bad & 0x8000000000000000ULL) mm_flag_nonfinite(xs, nk, start, m, bad_x);
        }
    #if defined(__x86_64__)
        if (stream) _mm_sfence();
    #endif
    }
    #undef MM_EMR_T

    static void mm_emr_par(const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t n,
                           double scaling, float *out, uint32_t *tbad, int nt, Py_ssize_t grain)
    {
        int stream = n >= MM_EMR_STREAM_MIN;
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_emr(xs, b, nk, lo, hi, scaling, out, tbad + (Py_ssize_t)tid * nk, stream);
        });
    }

    /* Fisher-weighted average on [lo0, hi0): fw = (f + eps) * w_k, num += fw * x,
       den += fw, fsum += f * w_k (k = 0..N-1 per element, from 0.0); out = num / den,
       fout = fsum / total. Blocks of MM_FISHER_BLOCK elements whose three float64
       accumulators stay in L1/L2 while the inputs stream through four
       contributors per sweep (eight sequential streams; per element the additions
       still run k = 0, 1, 2, ... in order, so the grouping changes no bit).
       Flags: bad_f[k] bit 31 when a Fisher value is NaN, Inf or < 0 (-0.0 is
       fine); bad_x[k] bit 31 when a value is NaN or Inf. The sweeps only OR the
       Fisher sign bits: a finite number times NaN/Inf is NaN/Inf (0 * Inf is
       NaN), so a NaN/Inf Fisher value makes fsum non-finite, a NaN/Inf value
       makes num non-finite (fw is finite or the Fisher value is bad), and a
       non-finite float64 sum stays so; a block with finite sums and no Fisher
       sign bit has no bad input, and any other block is rescanned to set the
       exact flags. Any block size gives the same bytes. */
    #define MM_FISHER_BLOCK 4096
    /* Calls over at least this many elements write both outputs with
       non-temporal stores (see mm_put_f32). */
    #define MM_FISHER_STREAM_MIN ((Py_ssize_t)1 << 20)
    #define MM_FSTEP(x, f, wk, j) do { \
            double fd_ = (double)(f)[j]; \
            double fw_ = (fd_ + eps) * (wk); \
            nu = nu + fw_ * (double)(x)[j]; \
            de = de + fw_; \
            fs_ = fs_ + fd_ * (wk); \
            uint32_t sb_; memcpy(&sb_, &(f)[j], 4); sgn |= sb_; \
        } while (0)
    MM_CLONES static void mm_fisher(const float *const *xs, const float *const *fs, const double *w,
                                    Py_ssize_t nk, Py_ssize_t lo0, Py_ssize_t hi0, double eps, double total,
                                    float *out, float *fout, uint32_t *bad_f, uint32_t *bad_x,
                                    double *restrict scratch, int stream)
    {
        double *restrict num = scratch, *restrict den = scratch + MM_FISHER_BLOCK;
        double *restrict fsum = scratch + 2 * MM_FISHER_BLOCK;
        float *restrict row = (float *)(scratch + 3 * MM_FISHER_BLOCK);
        float *restrict frow = row + MM_FISHER_BLOCK;
        for (Py_ssize_t lo = lo0; lo < hi0; lo += MM_FISHER_BLOCK) {
            Py_ssize_t m = hi0 - lo < MM_FISHER_BLOCK ? hi0 - lo : MM_FISHER_BLOCK;
            uint32_t sgn = 0;
            Py_ssize_t k = 0;
            if (nk >= 4) {
                const float *x0 = xs[0] + lo, *x1 = xs[1] + lo, *x2 = xs[2] + lo, *x3 = xs[3] + lo;
                const float *f0 = fs[0] + lo, *f1 = fs[1] + lo, *f2 = fs[2] + lo, *f3 = fs[3] + lo;
                const double w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
                for (Py_ssize_t j = 0; j < m; j++) {
                    double nu = 0.0, de = 0.0, fs_ = 0.0;
                    MM_FSTEP(x0, f0, w0, j);
                    MM_FSTEP(x1, f1, w1, j);
                    MM_FSTEP(x2, f2, w2, j);
                    MM_FSTEP(x3, f3, w3, j);
                    num[j] = nu; den[j] = de; fsum[j] = fs_;
                }
                k = 4;
            } else {
                for (Py_ssize_t j = 0; j < m; j++) { num[j] = 0.0; den[j] = 0.0; fsum[j] = 0.0; }
            }
            for (; k + 4 <= nk; k += 4) {
                const float *x0 = xs[k] + lo, *x1 = xs[k + 1] + lo, *x2 = xs[k + 2] + lo, *x3 = xs[k + 3] + lo;
                const float *f0 = fs[k] + lo, *f1 = fs[k + 1] + lo, *f2 = fs[k + 2] + lo, *f3 = fs[k + 3] + lo;
                const double w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
                for (Py_ssize_t j = 0; j < m; j++) {
                    double nu = num[j], de = den[j], fs_ = fsum[j];
                    MM_FSTEP(x0, f0, w0, j);
                    MM_FSTEP(x1, f1, w1, j);
                    MM_FSTEP(x2, f2, w2, j);
                    MM_FSTEP(x3, f3, w3, j);
                    num[j] = nu; den[j] = de; fsum[j] = fs_;
                }
            }
            for (; k < nk; k++) {
                const float *x0 = xs[k] + lo, *f0 = fs[k] + lo;
                const double w0 = w[k];
                for (Py_ssize_t j = 0; j < m; j++) {
                    double nu = num[j], de = den[j], fs_ = fsum[j];
                    MM_FSTEP(x0, f0, w0, j);
                    num[j] = nu; den[j] = de; fsum[j] = fs_;
                }
            }
            uint64_t bad = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                MM_FCHECK(num[j]);
                MM_FCHECK(fsum[j]);
                row[j] = (float)(num[j] / den[j]);
                frow[j] = (float)(fsum[j] / total);
            }
            mm_put_f32(out + lo, row, m, stream);
            mm_put_f32(fout + lo, frow, m, stream);
            if ((bad & 0x8000000000000000ULL) || (sgn & 0x80000000u)) {
                mm_flag_nonfinite(xs, nk, lo, m, bad_x);
                mm_flag_bad_weights(fs, nk, lo, m, bad_f);
            }
        }
    #if defined(__x86_64__)
        if (stream) _mm_sfence();  /* streaming stores visible before the join */
    #endif
    }

    /* Bytes of scratch one thread of mm_fisher_par needs. */
    static inline size_t mm_fisher_scratch(void)
    {
        return MM_FISHER_BLOCK * (3 * sizeof(double) + 2 * sizeof(float));
    }

    static void mm_fisher_par(const float *const *xs, const float *const *fs, const double *w, Py_ssize_t nk,
                              Py_ssize_t n, double eps, double total, float *out, float *fout,
                              uint32_t *tbad, int nt, Py_ssize_t grain, char *scratch)
    {
        int stream = n >= MM_FISHER_STREAM_MIN;
        MM_PAR_BLOCKS(n, grain, nt, {
            uint32_t *mine = tbad + (Py_ssize_t)tid * 2 * nk;
            mm_fisher(xs, fs, w, nk, lo, hi, eps, total, out, fout, mine, mine + nk,
                      (double *)(scratch + (size_t)tid * mm_fisher_scratch()), stream);
        });
    }

    /* Per contributor k: sq[l] += x*x and s1[l] += x for the elements whose global
       index is = l (mod 8), in increasing index, in float64. lanes[k*16 + 0..7] = sum
       of squares, [k*16 + 8..15] = sums. Contributors run in parallel (each its own
       sums). flags[k] bit 31: x_k holds NaN/Inf. */
    /* One element into its lane: the NaN/Inf flag bits, the square and the value. */
    static inline void mm_moment_step(float xi, double *sq, double *s1, int l, uint32_t *f)
    {
        double v = (double)xi;
        uint32_t bits;
        memcpy(&bits, &xi, 4);
        *f |= (bits & 0x7F800000u) + 0x00800000u;
        sq[l] = sq[l] + v * v;
        s1[l] = s1[l] + v * 1.0;
    }

    MM_CLONES static void mm_moments_one(const float *x, Py_ssize_t n, uint64_t start, double *lanes,
                                         uint32_t *flag)
    {
        double sq[8], s1[8];
        uint32_t f = 0;
        for (int l = 0; l < 8; l++) { sq[l] = lanes[l]; s1[l] = lanes[8 + l]; }
        Py_ssize_t i = 0;
        Py_ssize_t head = (Py_ssize_t)((8 - (start & 7)) & 7);
        if (head > n) head = n;
        for (; i < head; i++)
            mm_moment_step(x[i], sq, s1, (int)((start + (uint64_t)i) & 7), &f);
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++)
                mm_moment_step(x[i + l], sq, s1, l, &f);
        for (; i < n; i++)
            mm_moment_step(x[i], sq, s1, (int)((start + (uint64_t)i) & 7), &f);
        for (int l = 0; l < 8; l++) { lanes[l] = sq[l]; lanes[8 + l] = s1[l]; }
        *flag = f;
    }

    static void mm_moments(const float *const *xs, Py_ssize_t nk, Py_ssize_t n, uint64_t start, double *lanes,
                           uint32_t *flags, int nt)
    {
        #pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if(nt > 1)
        for (Py_ssize_t k = 0; k < nk; k++) mm_moments_one(xs[k], n, start, lanes + k * 16, flags + k);
    }

    /* safe_merge, first pass on [lo0, hi0): per element, t_k = x_k - b (float64),
       m = sum_k wn_k t_k, then var = sum_k wn_k ((t_k - m)(t_k - m)), k = 0..N-1;
       var[e] = var, out[e] = (float)(b + m). Contributor-major over blocks so each
       inner loop is a vectorisable stream (per element the same order). */
    #define MM_SAFE_BLOCK 512
    MM_CLONES static void mm_safe_moments(const float *const *xs, const float *b, const double *wn, Py_ssize_t nk,
                                          Py_ssize_t lo0, Py_ssize_t hi0, double *var, float *out, uint32_t *flags)
    {
        double m[MM_SAFE_BLOCK], v[MM_SAFE_BLOCK], bb[MM_SAFE_BLOCK];
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SAFE_BLOCK) {
            Py_ssize_t len = hi0 - i0 < MM_SAFE_BLOCK ? hi0 - i0 : MM_SAFE_BLOCK;
            for (Py_ssize_t j = 0; j < len; j++) {
                bb[j] = b != NULL ? (double)b[i0 + j] : 0.0;
                m[j] = 0.0;
                v[j] = 0.0;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                const double w = wn[k];
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    uint32_t bits;
                    memcpy(&bits, &x[j], 4);
                    f |= (bits & 0x7F800000u) + 0x00800000u;
                    m[j] = m[j] + w * ((double)x[j] - bb[j]);
                }
                flags[k] |= f;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                const double w = wn[k];
                for (Py_ssize_t j = 0; j < len; j++) {
                    double d = ((double)x[j] - bb[j]) - m[j];
                    v[j] = v[j] + w * (d * d);
                }
            }
            for (Py_ssize_t j = 0; j < len; j++) {
                var[i0 + j] = v[j];
                out[i0 + j] = (float)(bb[j] + m[j]);
            }
        }
    }

    static void mm_safe_moments_par(const float *const *xs, const float *b, const double *wn, Py_ssize_t nk,
                                    Py_ssize_t n, double *var, float *out, uint32_t *tflags, int nt,
                                    Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_safe_moments(xs, b, wn, nk, lo, hi, var, out, tflags + (Py_ssize_t)tid * nk);
        });
    }

    /* The k-th smallest (0-based) of n non-negative doubles without -0.0 or NaN, which
       order like their bit patterns: four counting passes, each fixing the next 16 bits
       of the answer among the values that share the bits fixed so far. hist: 65536. */
    static double mm_kth_nonneg(const double *v, Py_ssize_t n, Py_ssize_t k, uint64_t *hist)
    {
        uint64_t prefix = 0;
        for (int level = 0; level < 4; level++) {
            const int sh = 48 - 16 * level;
            memset(hist, 0, sizeof(uint64_t) * 65536);
            if (level == 0) {
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint64_t b;
                    memcpy(&b, &v[i], 8);
                    hist[b >> 48]++;
                }
            } else {
                const int hs = sh + 16;
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint64_t b;
                    memcpy(&b, &v[i], 8);
                    if ((b >> hs) == prefix) hist[(b >> sh) & 0xFFFF]++;
                }
            }
            uint64_t d = 0;
            while ((Py_ssize_t)hist[d] <= k) { k -= (Py_ssize_t)hist[d]; d++; }
            prefix = (prefix << 16) | d;
        }
        double r;
        memcpy(&r, &prefix, 8);
        return r;
    }

    /* safe_merge, second pass: where var >= thr and var > 0 the element keeps the base:
       out = (float)(b + 0.0) (b = 0 without a base). */
    MM_CLONES static void mm_safe_freeze(const double *var, double thr, const float *b, Py_ssize_t n, float *out)
    {
        for (Py_ssize_t e = 0; e < n; e++) {
            double bb = b != NULL ? (double)b[e] : 0.0;
            if (var[e] >= thr && var[e] > 0.0) out[e] = (float)(bb + 0.0);
        }
    }
    """
    int mm_della_thresholds(const float** xs, const float* b, Py_ssize_t nk, Py_ssize_t rows,
                            Py_ssize_t cols, double density, double epsilon, uint32_t* thr, int nt) nogil
    int mm_della_combine_par(const float** xs, const float* b, const double* w, const uint64_t* keys,
                             const uint32_t* thr, Py_ssize_t nk, Py_ssize_t n, uint64_t g0, int consensus,
                             double inv_total, double scaling, float* out, int nt, Py_ssize_t grain) nogil
    void mm_emr_par(const float** xs, const float* b, Py_ssize_t nk, Py_ssize_t n, double scaling,
                    float* out, uint32_t* tbad, int nt, Py_ssize_t grain) nogil
    void mm_fisher_par(const float** xs, const float** fs, const double* w, Py_ssize_t nk, Py_ssize_t n,
                       double eps, double total, float* out, float* fout, uint32_t* tbad, int nt,
                       Py_ssize_t grain, char* scratch) nogil
    size_t mm_fisher_scratch() nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil
    void mm_moments(const float** xs, Py_ssize_t nk, Py_ssize_t n, uint64_t start, double* lanes,
                    uint32_t* flags, int nt) nogil
    void mm_safe_moments_par(const float** xs, const float* b, const double* wn, Py_ssize_t nk, Py_ssize_t n,
                             double* var, float* out, uint32_t* tflags, int nt, Py_ssize_t grain) nogil
    void mm_safe_freeze(const double* var, double thr, const float* b, Py_ssize_t n, float* out) nogil
    double mm_kth_nonneg(const double* v, Py_ssize_t n, Py_ssize_t k, uint64_t* hist) nogil




def della_merge(list xs, object base, const double[::1] weights, const uint64_t[::1] keys,
                Py_ssize_t cols, uint64_t start, double density, double epsilon, int consensus,
                double inv_total, double scaling, float[::1] out, int threads=0):
    """DELLA on one chunk of whole rows (``len(out)`` a multiple of ``cols``) at element ``start``.

    ``xs``: the N float32 contributions of the chunk (finite; the caller checks),
    ``base`` float32 or None (delta contributions), ``keys`` the N PRNG stream keys,
    ``consensus`` 0 (weighted sum times ``inv_total``), 1 (sign of the weighted sum)
    or 2 (sign vote). Bytes do not depend on ``threads``.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int want = threads if threads > 0 else get_threads()
    cdef int nt1 = want if want > 0 else 1
    cdef int nt2 = mm_team(want, n, grain)
    cdef int err
    if cols < 1 or n % cols:
        raise ValueError(f"chunk of {n} elements is not whole rows of {cols}")
    if weights.shape[0] != nk or keys.shape[0] != nk or nk == 0:
        raise ValueError(f"{nk} inputs, {weights.shape[0]} weights, {keys.shape[0]} keys")
    if not 0 <= consensus <= 2:
        raise ValueError("consensus must be 0, 1 or 2")
    if n == 0:
        return
    cdef const float* b = optional_f32(base, n)
    cdef const float** p = gather_new_f32(xs, n)
    cdef uint32_t* thr = <uint32_t*>malloc(nk * n * sizeof(uint32_t))
    if thr == NULL:
        free(p)
        raise MemoryError()
    try:
        with nogil:
            err = mm_della_thresholds(p, b, nk, n // cols, cols, density, epsilon, thr, nt1)
            if not err:
                err = mm_della_combine_par(p, b, &weights[0], &keys[0], thr, nk, n, start, consensus,
                                           inv_total, scaling, &out[0], nt2, grain)
        if err:
            raise MemoryError()
    finally:
        free(thr)
        free(p)


def emr_elect(list xs, object base, double scaling, float[::1] out, int threads=0):
    """EMR elect step on one chunk; ``xs`` float32, ``base`` float32 (finite) or None.

    Returns the first k whose chunk holds NaN or Inf (the output is then
    meaningless), or -1.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    if n == 0:
        return -1
    cdef const float* b = optional_f32(base, n)
    cdef const float** p = gather_new_f32(xs, n)
    cdef uint32_t* tbad = <uint32_t*>calloc(max(nk, 1) * nt, sizeof(uint32_t))
    try:
        if tbad == NULL:
            raise MemoryError()
        with nogil:
            mm_emr_par(p, b, nk, n, scaling, &out[0], tbad, nt, grain)
        return first_nonfinite(tbad, nk, nt)
    finally:
        free(tbad)
        free(p)


def fisher_average(list xs, list fs, const double[::1] weights, double epsilon, double total,
                   float[::1] out, float[::1] fout, int threads=0):
    """Fisher-weighted average of one chunk into ``out`` and the weighted mean Fisher into ``fout``.

    Returns ``(k, what)`` for the first contributor k whose chunk is bad, checked
    in the order Fisher then values: what 0 = a Fisher value is not finite or is
    negative, 1 = a value is not finite; ``(-1, 0)`` if all are fine.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef Py_ssize_t k, t
    if len(fs) != nk or weights.shape[0] != nk or fout.shape[0] != n:
        raise ValueError("xs, fs, weights and outputs must match")
    if n == 0:
        return -1, 0
    cdef const float** px = gather_new_f32(xs, n)
    cdef const float** pf = NULL
    cdef uint32_t* tbad = <uint32_t*>calloc(2 * nk * nt, sizeof(uint32_t))
    cdef char* scratch = <char*>malloc(nt * mm_fisher_scratch())
    try:
        if tbad == NULL or scratch == NULL:
            raise MemoryError()
        pf = gather_new_f32(fs, n)
        with nogil:
            mm_fisher_par(px, pf, &weights[0], nk, n, epsilon, total, &out[0], &fout[0], tbad, nt, grain,
                          scratch)
        for k in range(nk):
            for t in range(1, nt):
                tbad[k] |= tbad[t * 2 * nk + k]
                tbad[nk + k] |= tbad[t * 2 * nk + nk + k]
            if tbad[k] & NONFINITE:
                return k, 0
            if tbad[nk + k] & NONFINITE:
                return k, 1
        return -1, 0
    finally:
        free(tbad)
        free(scratch)
        free(px)
        free(pf)


def moment_lanes(list xs, uint64_t start, double[:, :, ::1] lanes, int threads=0):
    """Add this chunk's sums of x_k^2 (``lanes[k, 0]``) and x_k (``lanes[k, 1]``) by lane.

    Element ``start + i`` goes to lane ``(start + i) mod 8``, each lane in
    increasing index, in float64, at O(1) work per element. Contributors run in
    parallel. Returns the first input holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t k, n
    cdef int nt = threads if threads > 0 else get_threads()
    if nk == 0:
        raise ValueError("no inputs")
    if lanes.shape[0] != nk or lanes.shape[1] != 2 or lanes.shape[2] != 8:
        raise ValueError("lanes must have shape (N, 2, 8)")
    n = (<cnp.ndarray>xs[0]).size
    if nt > nk:
        nt = <int>nk
    cdef const float** p = gather_new_f32(xs, n)
    cdef uint32_t* flags = <uint32_t*>calloc(nk, sizeof(uint32_t))
    try:
        if flags == NULL:
            raise MemoryError()
        with nogil:
            mm_moments(p, nk, n, start, &lanes[0, 0, 0], flags, nt)
        for k in range(nk):
            if flags[k] & NONFINITE:
                return k
        return -1
    finally:
        free(flags)
        free(p)


def safe_moments(list xs, object base, const double[::1] wn, double[::1] var, float[::1] out, int threads=0):
    """safe_merge's first pass over one chunk: weighted variance and ``b + mean``.

    Per element, in float64 with k = 0..N-1 in order: ``t_k = x_k - b``,
    ``m = sum wn_k t_k``, ``var = sum wn_k ((t_k - m)(t_k - m))``; writes ``var``
    and ``out = float32(b + m)``. Returns the first input holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    if nk == 0:
        raise ValueError("no inputs")
    if wn.shape[0] != nk or var.shape[0] != n:
        raise ValueError("wn needs one weight per input and var one entry per element")
    cdef const float* b = optional_f32(base, n)
    if n == 0:
        return -1
    cdef const float** px = gather_new_f32(xs, n)
    cdef uint32_t* tflags = <uint32_t*>calloc(nk * nt, sizeof(uint32_t))
    try:
        if tflags == NULL:
            raise MemoryError()
        with nogil:
            mm_safe_moments_par(px, b, &wn[0], nk, n, &var[0], &out[0], tflags, nt, grain)
        return first_nonfinite(tflags, nk, nt)
    finally:
        free(tflags)
        free(px)


def safe_freeze(const double[::1] var, double thr, object base, float[::1] out):
    """safe_merge's second pass over one chunk: ``out = float32(b + 0.0)`` where
    ``var >= thr`` and ``var > 0`` (``b`` None means 0)."""
    cdef Py_ssize_t n = out.shape[0]
    if var.shape[0] != n:
        raise ValueError("var and out must have the same length")
    cdef const float* b = optional_f32(base, n)
    if n:
        with nogil:
            mm_safe_freeze(&var[0], thr, b, n, &out[0])


def kth_smallest_nonnegative(const double[::1] values, Py_ssize_t k):
    """``np.partition(values, k)[k]`` for non-negative float64 values (no -0.0, no NaN).

    Such values order like their bit patterns: four counting passes over the
    array (65536 bins each) fix the answer 16 bits at a time. Exact, O(n), no
    copy of the array (numpy's introselect copies it and is several times slower
    at tens of millions of elements).
    """
    cdef Py_ssize_t n = values.shape[0]
    if not 0 <= k < n:
        raise ValueError(f"k must be in [0, {n}), got {k}")
    cdef uint64_t* hist = <uint64_t*>malloc(65536 * sizeof(uint64_t))
    cdef double r
    if hist == NULL:
        raise MemoryError()
    try:
        with nogil:
            r = mm_kth_nonneg(&values[0], n, k, hist)
        return r
    finally:
        free(hist)
