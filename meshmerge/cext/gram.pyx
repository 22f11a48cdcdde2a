# cython: language_level=3
"""Gram matrices of contributions, for strategies that work in their span.

SLERP, Karcher/spherical means, Krum, geometric median (Weiszfeld), centered
clipping, FoolsGold and model stock only need inner products between
contributions. ``gram_accumulate`` computes all of them in one streaming,
multi-threaded pass; the strategy then runs its (small, N-dimensional)
iteration on coefficients and a final pass writes ``sum_k c_k x_k``.

Reduction order and precision (fixed by the element index, never by the
chunking, the thread count or the CPU's vector width):

* ``v_k = x_k - b`` rounded to float32 (``x_k`` itself without a base);
* the tensor is cut into blocks of ``GRAM_BLOCK`` = 512 elements at global
  indices multiple of 512; inside a block, element ``i`` goes to float32 lane
  ``i mod 16`` and each lane accumulates ``a = fmaf(v_j[i], v_k[i], a)`` in
  increasing ``i`` (32 steps per lane; IEEE fusedMultiplyAdd, one rounding per
  step, the same on every CPU: AVX-512 or AVX2 + FMA code where available,
  otherwise a portable loop, all giving the same bits);
* each block's 16 lanes are widened to float64 and added lane-wise, in block
  order, into the float64 lanes of its span (``GRAM_SPAN`` = 16384 elements,
  32 blocks); a span's value is its lanes 0..15 added in order;
* spans are added into the running float64 Gram in span order.

So a Gram entry carries float32 rounding only within a block (error at most
about ``33 * 2^-24 * sum_i |v_j[i] v_k[i]|`` per block, usually far less),
then float64 across blocks. A block whose largest ``|v|`` is ``2^60`` or more
(products could overflow float32) is summed with exact float64 products in the
same lanes instead, so huge (e.g. Byzantine) contributions give large finite
Gram entries, not Inf. Products smaller than about ``1e-38`` (entries below
about ``1e-19``) lose precision to float32 underflow.

Spans are the unit of work of the threads, and chunks passed to
``gram_accumulate`` must start at a multiple of ``GRAM_SPAN`` (the last chunk
of a tensor may end anywhere), so every span is always seen whole. Memory:
per thread ``N * 2048`` floats of scratch and ``N (N + 1) / 2 * 16`` doubles
of span lanes; span values go through a buffer of at most 8 MB (or one span).
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint32_t
from libc.stdlib cimport calloc, free, malloc

from meshmerge.cext._common cimport first_nonfinite, gather_f32, optional_f32
from meshmerge.cext.threads import get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"
    #define MM_GB 512          /* block: float32 lanes */
    #define MM_GL 16           /* lanes */
    #define MM_GSPAN 16384     /* span: float64 lanes, unit of threads */
    #define MM_GLD 2048        /* elements per row loaded at once (4 blocks) */
    #define MM_GT 4            /* register tile: 4 x 4 pairs */
    /* 2^60 as the bit pattern of a float32 magnitude: blocks at or above go float64. */
    #define MM_GBIG 0x5D800000u


    static inline Py_ssize_t mm_pair(Py_ssize_t nk, Py_ssize_t j, Py_ssize_t k)
    {
        /* index of (j, k), j <= k, in the row-major upper triangle */
        return j * nk - j * (j - 1) / 2 + (k - j);
    }

    /* One block (scratch rows v[k * ld ..], MM_GB elements, zero padded) into the span lanes
       sl[pair * MM_GL + lane] (float64): lane l of pair (j, k) is
       a = fmaf(v_j[i], v_k[i], a) over i = l, l + 16, ... (IEEE fusedMultiplyAdd, one
       rounding), then widened and added to sl. The AVX-512 version does exactly these
       operations on 16 lanes at once (the AVX2 one on 2 x 8); the portable one per lane. */
    static void mm_gram_block_portable(const float *v, Py_ssize_t ld, Py_ssize_t nk, double *sl)
    {
        for (Py_ssize_t j = 0; j < nk; j++) {
            for (Py_ssize_t k = j; k < nk; k++) {
                float a[MM_GL] = {0};
                const float *r = v + j * ld, *c = v + k * ld;
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL)
                    for (int l = 0; l < MM_GL; l++) a[l] = fmaf(r[i + l], c[i + l], a[l]);
                double *d = sl + mm_pair(nk, j, k) * MM_GL;
                for (int l = 0; l < MM_GL; l++) d[l] = d[l] + (double)a[l];
            }
        }
    }

    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    #define MM_GRAM_AVX512 1
    #include <immintrin.h>
    __attribute__((target("avx512f"))) static inline void mm_gram_put(double *d, __m512 a)
    {
        __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
        __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
        _mm512_storeu_pd(d, _mm512_add_pd(_mm512_loadu_pd(d), lo));
        _mm512_storeu_pd(d + 8, _mm512_add_pd(_mm512_loadu_pd(d + 8), hi));
    }

    /* AVX2 + FMA: lanes 0-7 and 8-15 in two registers, one pair at a time (same bits). */
    __attribute__((target("avx2,fma"))) static void mm_gram_block_avx2(const float *v, Py_ssize_t ld, Py_ssize_t nk, double *sl)
    {
        for (Py_ssize_t j = 0; j < nk; j++) {
            for (Py_ssize_t k = j; k < nk; k++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                const float *r = v + j * ld, *c = v + k * ld;
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(c + i), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 8), _mm256_loadu_ps(c + i + 8), a1);
                }
                double *d = sl + mm_pair(nk, j, k) * MM_GL;
                _mm256_storeu_pd(d, _mm256_add_pd(_mm256_loadu_pd(d), _mm256_cvtps_pd(_mm256_castps256_ps128(a0))));
                _mm256_storeu_pd(d + 4, _mm256_add_pd(_mm256_loadu_pd(d + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(a0, 1))));
                _mm256_storeu_pd(d + 8, _mm256_add_pd(_mm256_loadu_pd(d + 8), _mm256_cvtps_pd(_mm256_castps256_ps128(a1))));
                _mm256_storeu_pd(d + 12, _mm256_add_pd(_mm256_loadu_pd(d + 12), _mm256_cvtps_pd(_mm256_extractf128_ps(a1, 1))));
            }
        }
    }

    __attribute__((target("avx512f"))) static void mm_gram_block_avx512(const float *v, Py_ssize_t ld, Py_ssize_t nk, double *sl)
    {
        Py_ssize_t full = nk / MM_GT * MM_GT;
        for (Py_ssize_t j0 = 0; j0 < full; j0 += MM_GT) {
            const float *r0 = v + j0 * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
            /* diagonal tile: the 10 pairs j0 + r <= j0 + c */
            {
                __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a11 = a00, a12 = a00,
                       a13 = a00, a22 = a00, a23 = a00, a33 = a00;
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL) {
                    __m512 x0 = _mm512_loadu_ps(r0 + i), x1 = _mm512_loadu_ps(r1 + i);
                    __m512 x2 = _mm512_loadu_ps(r2 + i), x3 = _mm512_loadu_ps(r3 + i);
                    a00 = _mm512_fmadd_ps(x0, x0, a00); a01 = _mm512_fmadd_ps(x0, x1, a01);
                    a02 = _mm512_fmadd_ps(x0, x2, a02); a03 = _mm512_fmadd_ps(x0, x3, a03);
                    a11 = _mm512_fmadd_ps(x1, x1, a11); a12 = _mm512_fmadd_ps(x1, x2, a12);
                    a13 = _mm512_fmadd_ps(x1, x3, a13); a22 = _mm512_fmadd_ps(x2, x2, a22);
                    a23 = _mm512_fmadd_ps(x2, x3, a23); a33 = _mm512_fmadd_ps(x3, x3, a33);
                }
                mm_gram_put(sl + mm_pair(nk, j0, j0) * MM_GL, a00);
                mm_gram_put(sl + mm_pair(nk, j0, j0 + 1) * MM_GL, a01);
                mm_gram_put(sl + mm_pair(nk, j0, j0 + 2) * MM_GL, a02);
                mm_gram_put(sl + mm_pair(nk, j0, j0 + 3) * MM_GL, a03);
                mm_gram_put(sl + mm_pair(nk, j0 + 1, j0 + 1) * MM_GL, a11);
                mm_gram_put(sl + mm_pair(nk, j0 + 1, j0 + 2) * MM_GL, a12);
                mm_gram_put(sl + mm_pair(nk, j0 + 1, j0 + 3) * MM_GL, a13);
                mm_gram_put(sl + mm_pair(nk, j0 + 2, j0 + 2) * MM_GL, a22);
                mm_gram_put(sl + mm_pair(nk, j0 + 2, j0 + 3) * MM_GL, a23);
                mm_gram_put(sl + mm_pair(nk, j0 + 3, j0 + 3) * MM_GL, a33);
            }
            for (Py_ssize_t k0 = j0 + MM_GT; k0 < full; k0 += MM_GT) {
                const float *c0 = v + k0 * ld, *c1 = c0 + ld, *c2 = c1 + ld, *c3 = c2 + ld;
                __m512 a[16];
                for (int q = 0; q < 16; q++) a[q] = _mm512_setzero_ps();
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL) {
                    __m512 x0 = _mm512_loadu_ps(r0 + i), x1 = _mm512_loadu_ps(r1 + i);
                    __m512 x2 = _mm512_loadu_ps(r2 + i), x3 = _mm512_loadu_ps(r3 + i);
                    __m512 y0 = _mm512_loadu_ps(c0 + i), y1 = _mm512_loadu_ps(c1 + i);
                    __m512 y2 = _mm512_loadu_ps(c2 + i), y3 = _mm512_loadu_ps(c3 + i);
                    a[0] = _mm512_fmadd_ps(x0, y0, a[0]); a[1] = _mm512_fmadd_ps(x0, y1, a[1]);
                    a[2] = _mm512_fmadd_ps(x0, y2, a[2]); a[3] = _mm512_fmadd_ps(x0, y3, a[3]);
                    a[4] = _mm512_fmadd_ps(x1, y0, a[4]); a[5] = _mm512_fmadd_ps(x1, y1, a[5]);
                    a[6] = _mm512_fmadd_ps(x1, y2, a[6]); a[7] = _mm512_fmadd_ps(x1, y3, a[7]);
                    a[8] = _mm512_fmadd_ps(x2, y0, a[8]); a[9] = _mm512_fmadd_ps(x2, y1, a[9]);
                    a[10] = _mm512_fmadd_ps(x2, y2, a[10]); a[11] = _mm512_fmadd_ps(x2, y3, a[11]);
                    a[12] = _mm512_fmadd_ps(x3, y0, a[12]); a[13] = _mm512_fmadd_ps(x3, y1, a[13]);
                    a[14] = _mm512_fmadd_ps(x3, y2, a[14]); a[15] = _mm512_fmadd_ps(x3, y3, a[15]);
                }
                for (int r = 0; r < MM_GT; r++)
                    for (int c = 0; c < MM_GT; c++)
                        mm_gram_put(sl + mm_pair(nk, j0 + r, k0 + c) * MM_GL, a[r * MM_GT + c]);
            }
        }
        /* rows past the last full tile: one pair at a time */
        for (Py_ssize_t j = 0; j < nk; j++) {
            for (Py_ssize_t k = j > full ? j : full; k < nk; k++) {
                __m512 a = _mm512_setzero_ps();
                const float *r = v + j * ld, *c = v + k * ld;
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(c + i), a);
                mm_gram_put(sl + mm_pair(nk, j, k) * MM_GL, a);
            }
        }
    }
    #endif

    /* The same block with exact float64 products (huge entries). */
    static void mm_gram_block_f64(const float *v, Py_ssize_t ld, Py_ssize_t nk, double *sl)
    {
        for (Py_ssize_t j = 0; j < nk; j++) {
            for (Py_ssize_t k = j; k < nk; k++) {
                double a[MM_GL] = {0};
                const float *r = v + j * ld, *c = v + k * ld;
                for (Py_ssize_t i = 0; i < MM_GB; i += MM_GL)
                    for (int l = 0; l < MM_GL; l++) a[l] = a[l] + (double)r[i + l] * (double)c[i + l];
                double *d = sl + mm_pair(nk, j, k) * MM_GL;
                for (int l = 0; l < MM_GL; l++) d[l] = d[l] + a[l];
            }
        }
    }

    /* Copy rows [lo, hi) (hi - lo <= MM_GLD) as v = x - b into the scratch (row stride
       MM_GLD), zero padded to whole blocks;
       returns the largest magnitude bit pattern and ORs the NaN/Inf flags. Each cache
       line read also prefetches the same row's line MM_GLD elements ahead (below pf_end):
       N + 1 streams that each advance by only 2 KB per block are followed badly by
       the hardware prefetchers. The prefetches go to L2 (locality 2): a row's next
       MM_GLD elements are only read after all N rows of this load and their blocks,
       and pulled into L1 they evicted one another (measured ~25% slower). */
    MM_CLONES static uint32_t mm_gram_load(const float *const *p, const float *b, Py_ssize_t nk,
                                           Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t pf_end,
                                           float *v, uint32_t *flags)
    {
        uint32_t big = 0;
        Py_ssize_t m = hi - lo;
        Py_ssize_t pfm = pf_end - lo - MM_GLD;  /* prefetch while i < pfm */
        Py_ssize_t padded = (m + MM_GB - 1) / MM_GB * MM_GB;
        for (Py_ssize_t k = 0; k < nk; k++) {
            const float *x = p[k] + lo;
            float *d = v + k * MM_GLD;
            uint32_t f = 0, mx = 0, fl[16] = {0}, ml[16] = {0};
            Py_ssize_t i = 0;
            for (; i + 16 <= m; i += 16) {
                if (i < pfm) {
                    __builtin_prefetch(x + i + MM_GLD, 0, 2);
                    if (b != NULL) __builtin_prefetch(b + lo + i + MM_GLD, 0, 2);
                }
                for (int l = 0; l < 16; l++) {
                    uint32_t bits, ab;
                    memcpy(&bits, &x[i + l], 4);
                    fl[l] |= (bits & 0x7F800000u) + 0x00800000u;
                    float t = b == NULL ? x[i + l] : x[i + l] - b[lo + i + l];
                    d[i + l] = t;
                    memcpy(&ab, &t, 4);
                    ab &= 0x7FFFFFFFu;
                    ml[l] = ab > ml[l] ? ab : ml[l];
                }
            }
            for (int l = 0; l < 16; l++) {
                f |= fl[l];
                mx = ml[l] > mx ? ml[l] : mx;
            }
            for (; i < m; i++) {
                uint32_t bits, ab;
                memcpy(&bits, &x[i], 4);
                f |= (bits & 0x7F800000u) + 0x00800000u;
                float t = b == NULL ? x[i] : x[i] - b[lo + i];
                d[i] = t;
                memcpy(&ab, &t, 4);
                ab &= 0x7FFFFFFFu;
                mx = ab > mx ? ab : mx;
            }
            for (; i < padded; i++) d[i] = 0.0f;
            flags[k] |= f;
            big = mx > big ? mx : big;
        }
        return big;
    }

    #ifdef MM_GRAM_AVX512
    /* mm_gram_load with the lane accumulators in registers (same results). */
    __attribute__((target("avx512f"))) static uint32_t mm_gram_load_avx512(
        const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t hi,
        Py_ssize_t pf_end, float *v, uint32_t *flags)
    {
        const __m512i expm = _mm512_set1_epi32(0x7F800000), one = _mm512_set1_epi32(0x00800000);
        const __m512i absm = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i big = _mm512_setzero_si512();
        Py_ssize_t m = hi - lo;
        Py_ssize_t pfm = pf_end - lo - MM_GLD;
        Py_ssize_t padded = (m + MM_GB - 1) / MM_GB * MM_GB;
        const float *bb = b == NULL ? NULL : b + lo;
        for (Py_ssize_t k = 0; k < nk; k++) {
            const float *x = p[k] + lo;
            float *d = v + k * MM_GLD;
            __m512i f = _mm512_setzero_si512(), mx = _mm512_setzero_si512();
            Py_ssize_t i = 0;
            for (; i < m; i += 16) {
                __mmask16 mk = m - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m - i)) - 1u);
                if (i < pfm) {
                    __builtin_prefetch(x + i + MM_GLD, 0, 2);
                    if (bb != NULL) __builtin_prefetch(bb + i + MM_GLD, 0, 2);
                }
                __m512 xv = _mm512_maskz_loadu_ps(mk, x + i);
                f = _mm512_or_si512(f, _mm512_add_epi32(_mm512_and_si512(_mm512_castps_si512(xv), expm), one));
                __m512 t = bb == NULL ? xv : _mm512_sub_ps(xv, _mm512_maskz_loadu_ps(mk, bb + i));
                _mm512_storeu_ps(d + i, t);
                mx = _mm512_max_epu32(mx, _mm512_and_si512(_mm512_castps_si512(t), absm));
            }
            for (; i < padded; i += 16) _mm512_storeu_ps(d + i, _mm512_setzero_ps());
            flags[k] |= (uint32_t)_mm512_reduce_or_epi32(f);
            big = _mm512_max_epu32(big, mx);
        }
        return (uint32_t)_mm512_reduce_max_epu32(big);
    }
    #endif

    /* Spans of [0, n) (n counted from a span-aligned start) on nt threads; span s's
       value for pair q goes to res[s * npairs + q]. Thread t uses scratch
       v + t * nk * MM_GLD, lanes sl + t * npairs * MM_GL and flags tflags + t * nk. */
    static void mm_gram_par(const float *const *p, const float *b, Py_ssize_t nk, Py_ssize_t n,
                            double *res, float *v, double *sl, uint32_t *tflags, int nt, int isa)
    {
        const Py_ssize_t npairs = nk * (nk + 1) / 2;
    #ifdef MM_GRAM_AVX512
        /* isa: 0 = best available, 1 = portable C, 2 = AVX2 + FMA at most */
        const int avx512 = isa == 0 && __builtin_cpu_supports("avx512f");
        const int avx2 = isa != 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #else
        (void)isa;
    #endif
        MM_PAR_BLOCKS(n, MM_GSPAN, nt, {
            float *vt = v + (Py_ssize_t)tid * nk * MM_GLD;
            double *st = sl + (Py_ssize_t)tid * npairs * MM_GL;
            uint32_t *ft = tflags + (Py_ssize_t)tid * nk;
            memset(st, 0, sizeof(double) * (size_t)(npairs * MM_GL));
            for (Py_ssize_t u0 = lo; u0 < hi; u0 += MM_GLD) {
                Py_ssize_t u1 = hi - u0 < MM_GLD ? hi : u0 + MM_GLD;
    #ifdef MM_GRAM_AVX512
                uint32_t big = avx512 ? mm_gram_load_avx512(p, b, nk, u0, u1, n, vt, ft)
                                      : mm_gram_load(p, b, nk, u0, u1, n, vt, ft);
    #else
                uint32_t big = mm_gram_load(p, b, nk, u0, u1, n, vt, ft);
    #endif
                for (Py_ssize_t i0 = 0; i0 < u1 - u0; i0 += MM_GB) {
                    if (big >= MM_GBIG) mm_gram_block_f64(vt + i0, MM_GLD, nk, st);
    #ifdef MM_GRAM_AVX512
                    else if (avx512) mm_gram_block_avx512(vt + i0, MM_GLD, nk, st);
                    else if (avx2) mm_gram_block_avx2(vt + i0, MM_GLD, nk, st);
    #endif
                    else mm_gram_block_portable(vt + i0, MM_GLD, nk, st);
                }
            }
            double *rs = res + (lo / MM_GSPAN) * npairs;
            for (Py_ssize_t q = 0; q < npairs; q++) {
                double s = 0.0;
                for (int l = 0; l < MM_GL; l++) s = s + st[q * MM_GL + l];
                rs[q] = s;
            }
        });
    }
    """
    void mm_gram_par(const float** p, const float* b, Py_ssize_t nk, Py_ssize_t n,
                     double* res, float* v, double* sl, uint32_t* tflags, int nt, int isa) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil

cdef enum:
    MM_GLD_ = 2048
    MM_GSPAN_ = 16384
    MM_GL_ = 16

#: Elements per float32-accumulated block.
GRAM_BLOCK = 512
#: Elements per span (unit of threads); chunks must start at multiples of it.
GRAM_SPAN = 16384
#: Default for the most bytes of span values buffered per kernel call.
GRAM_BUFFER_BYTES = 1 << 23


def gram_accumulate(
    list xs, object base, Py_ssize_t start, double[:, ::1] acc, int threads=0, int isa=0,
    Py_ssize_t buffer_bytes=GRAM_BUFFER_BYTES,
):
    """Add this chunk's span values of ``sum_i v_j[i] v_k[i]`` (j <= k) into ``acc[j, k]``.

    ``v_k = x_k - base`` (``base`` None means 0); see the module docstring for the
    order and precision. ``start`` is the global index of the chunk's first
    element and must be a multiple of ``GRAM_SPAN``; only the last chunk of a
    tensor may have a length that is not. Only the upper triangle of ``acc`` is
    used. ``threads`` 0 means :func:`meshmerge.cext.threads.get_threads`;
    ``isa`` 0 uses the best code for this CPU, 1 the portable C, 2 at most AVX2 + FMA,
    and ``buffer_bytes`` bounds the span values held at once (both only for tests:
    neither changes a byte).
    Returns the index of the first input with NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        raise ValueError("no inputs")
    if start < 0 or start % MM_GSPAN_:
        raise ValueError(f"start must be a multiple of GRAM_SPAN ({GRAM_SPAN}), got {start}")
    if acc.shape[0] != nk or acc.shape[1] != nk:
        raise ValueError("acc must have shape (N, N)")
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef Py_ssize_t npairs = nk * (nk + 1) // 2
    cdef Py_ssize_t nspans = (n + MM_GSPAN_ - 1) // MM_GSPAN_
    # Spans per kernel call: their values are buffered (at most buffer_bytes, at least one span).
    cdef Py_ssize_t group = max(1, min(nspans, buffer_bytes // (npairs * 8)))
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), min(n, group * MM_GSPAN_), MM_GSPAN_)
    cdef const float** ptrs = <const float**>malloc(nk * sizeof(float*))
    cdef const float** gp = <const float**>malloc(nk * sizeof(float*))
    cdef double* res = <double*>malloc(group * npairs * sizeof(double))
    cdef float* v = <float*>malloc(nt * nk * MM_GLD_ * sizeof(float))
    cdef double* sl = <double*>malloc(nt * npairs * MM_GL_ * sizeof(double))
    cdef uint32_t* flags = <uint32_t*>calloc(nt * nk, sizeof(uint32_t))
    cdef const float* b
    cdef Py_ssize_t s, j, k, q, g0, g1, off
    cdef const float* gb
    cdef int bad = -1
    if ptrs == NULL or gp == NULL or res == NULL or v == NULL or sl == NULL or flags == NULL:
        free(ptrs); free(gp); free(res); free(v); free(sl); free(flags)
        raise MemoryError()
    try:
        gather_f32(xs, n, ptrs)
        b = optional_f32(base, n)
        if n == 0:
            return -1
        with nogil:
            g0 = 0
            while g0 < nspans:
                g1 = min(nspans, g0 + group)
                off = g0 * MM_GSPAN_
                for k in range(nk):
                    gp[k] = ptrs[k] + off
                gb = b
                if b != NULL:
                    gb = b + off
                mm_gram_par(gp, gb, nk, min(n, g1 * MM_GSPAN_) - off, res, v, sl, flags, nt, isa)
                for s in range(g1 - g0):
                    q = 0
                    for j in range(nk):
                        for k in range(j, nk):
                            acc[j, k] = acc[j, k] + res[s * npairs + q]
                            q += 1
                g0 = g1
            bad = first_nonfinite(flags, nk, nt)
        return bad
    finally:
        free(ptrs); free(gp); free(res); free(v); free(sl); free(flags)


def gram_finalize(const double[:, ::1] acc):
    """Symmetric (N, N) float64 Gram matrix from the upper triangle of ``acc``."""
    cdef Py_ssize_t nk = acc.shape[0]
    cdef Py_ssize_t j, k
    g = np.empty((nk, nk), dtype=np.float64)
    cdef double[:, ::1] gv = g
    for j in range(nk):
        for k in range(j, nk):
            gv[j, k] = acc[j, k]
            gv[k, j] = acc[j, k]
    return g
