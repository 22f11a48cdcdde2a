# cython: language_level=3
"""Kernels for the data-free proxies of data-driven merges (RegMean, AdaMerging, SUM).

``regmean_average``: per element, in float64 with contributors k = 0..N-1 in
order, ``g_k = w_k * (x_k * x_k + lam)`` (or ``w_k * (f_k + lam)`` with a
companion tensor ``f_k``), ``num = num + g_k * x_k``, ``den = den + g_k``,
``out = float32(num / den)``; with companions also
``fout = float32(sum_k w_k * f_k)``. Each ``+ - * /`` is exactly rounded and
nothing is contracted into an FMA (setup.py), so the bytes depend on neither
the chunking nor the thread count.

``abs_log_spans``: the sums ``sum_i a_i`` and ``sum_i a_i log a_i`` with
``a_i = |x_i - b_i|`` (float64 difference), per span of ``LOG_SPAN`` elements
at global indices that are multiples of ``LOG_SPAN``. Inside a span, element
``i`` goes to lane ``i mod 8``, each lane adds in increasing ``i``, and the
span value is lanes 0..7 added in order; the caller adds span values with a
correctly rounded sum. ``log`` is computed here with IEEE operations only
(exponent from the bits, mantissa reduced to [sqrt(1/2), sqrt(2)), then
``2 atanh(s)`` as a degree-17 odd polynomial in ``s = (m - 1)/(m + 1)``,
``|s| <= 0.1716``, truncation error below 3e-16), so it is the same on every
machine, unlike libm's ``log``; its error is a few ulp. Every ``a`` here is a
difference of float32 values, so never a float64 subnormal.

``mean_abs`` / ``keep_base_at_most``: split_unlearn_merge's weighted mean
magnitude ``sum_k w_k |x_k - b|`` (float64, k in order) and the pass that puts
the base back where it is at most a threshold.
"""

cimport numpy as cnp
from libc.stdlib cimport calloc, free, malloc
from libc.stdint cimport uint32_t

from meshmerge.cext._common cimport NONFINITE, first_nonfinite, gather_new_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

LOG_SPAN = 16384


cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"
    #include "mm_detmath.h"

    #define MM_RM_BLOCK 1024
    #define MM_LOG_SPAN 16384
    /* Calls over at least this many elements write the output with non-temporal stores. */
    #define MM_RM_STREAM_MIN ((Py_ssize_t)1 << 20)

    /* One element of one contributor into the running sums (see the module docstring);
       x, f are the block's pointers, wk its weight. */
    #define MM_RM_FREE(x, wk) do { \
            double xd_ = (double)(x)[j]; \
            double g_ = (xd_ * xd_ + lam) * (wk); \
            nu = nu + g_ * xd_; \
            de = de + g_; \
        } while (0)
    #define MM_RM_COMP(x, f, wk) do { \
            double xd_ = (double)(x)[j]; \
            double fd_ = (double)(f)[j]; \
            double g_ = (fd_ + lam) * (wk); \
            nu = nu + g_ * xd_; \
            de = de + g_; \
            fs_ = fs_ + fd_ * (wk); \
        } while (0)

    static inline uint32_t mm_bits32(float x) { uint32_t b; memcpy(&b, &x, 4); return b; }

    /* Contributors [k, k + 4) (or the one at k) over a block of m elements: the running sums
       live in num/den/fsum between groups and in registers inside one. */
    #define MM_RM_GROUP(STEP4, STEP1) do { \
            Py_ssize_t k = 0; \
            for (; k + 4 <= nk; k += 4) { \
                const float *x0 = xs[k] + lo, *x1 = xs[k + 1] + lo, *x2 = xs[k + 2] + lo, *x3 = xs[k + 3] + lo; \
                const double w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3]; \
                const int first = k == 0; \
                STEP4 \
            } \
            for (; k < nk; k++) { \
                const float *x0 = xs[k] + lo; \
                const double w0 = w[k]; \
                const int first = k == 0; \
                STEP1 \
            } \
        } while (0)

    /* Elements [lo0, hi0): out (and fout with companions), block by block. bad_x[k] /
       bad_f[k] get bit 31 if x_k is NaN/Inf / f_k is NaN, Inf or negative (not -0.0). */
    MM_CLONES static void mm_regmean(const float *const *xs, const float *const *fs, const double *w,
                                     Py_ssize_t nk, Py_ssize_t lo0, Py_ssize_t hi0, double lam,
                                     float *out, float *fout, uint32_t *bad_x, uint32_t *bad_f,
                                     double *restrict scratch, int stream)
    {
        double *restrict num = scratch, *restrict den = scratch + MM_RM_BLOCK;
        double *restrict fsum = scratch + 2 * MM_RM_BLOCK;
        float *restrict row = (float *)(scratch + 3 * MM_RM_BLOCK);
        float *restrict frow = row + MM_RM_BLOCK;
        for (Py_ssize_t lo = lo0; lo < hi0; lo += MM_RM_BLOCK) {
            Py_ssize_t m = hi0 - lo < MM_RM_BLOCK ? hi0 - lo : MM_RM_BLOCK;
            if (fs == NULL) {
                MM_RM_GROUP({
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double nu = first ? 0.0 : num[j]; double de = first ? 0.0 : den[j];
                        MM_RM_FREE(x0, w0); MM_RM_FREE(x1, w1); MM_RM_FREE(x2, w2); MM_RM_FREE(x3, w3);
                        num[j] = nu; den[j] = de;
                    }
                }, {
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double nu = first ? 0.0 : num[j]; double de = first ? 0.0 : den[j];
                        MM_RM_FREE(x0, w0);
                        num[j] = nu; den[j] = de;
                    }
                });
            } else {
                MM_RM_GROUP({
                    const float *f0 = fs[k] + lo; const float *f1 = fs[k + 1] + lo;
                    const float *f2 = fs[k + 2] + lo; const float *f3 = fs[k + 3] + lo;
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double nu = first ? 0.0 : num[j]; double de = first ? 0.0 : den[j];
                        double fs_ = first ? 0.0 : fsum[j];
                        MM_RM_COMP(x0, f0, w0); MM_RM_COMP(x1, f1, w1);
                        MM_RM_COMP(x2, f2, w2); MM_RM_COMP(x3, f3, w3);
                        num[j] = nu; den[j] = de; fsum[j] = fs_;
                    }
                }, {
                    const float *f0 = fs[k] + lo;
                    for (Py_ssize_t j = 0; j < m; j++) {
                        double nu = first ? 0.0 : num[j]; double de = first ? 0.0 : den[j];
                        double fs_ = first ? 0.0 : fsum[j];
                        MM_RM_COMP(x0, f0, w0);
                        num[j] = nu; den[j] = de; fsum[j] = fs_;
                    }
                });
            }
            /* A non-finite input makes num or den non-finite (g > 0, so x^2 or x * g is
               Inf/NaN); only then are the block's inputs rescanned for the exact flags.
               Companion signs are always checked (a negative g can cancel to finite sums). */
            uint64_t badsum = 0;
            for (Py_ssize_t j = 0; j < m; j++) {
                double q = num[j] / den[j];
                uint64_t b1, b2; memcpy(&b1, &num[j], 8); memcpy(&b2, &den[j], 8);
                badsum |= ((b1 & 0x7FF0000000000000ULL) + 0x0010000000000000ULL)
                        | ((b2 & 0x7FF0000000000000ULL) + 0x0010000000000000ULL);
                row[j] = (float)q;
            }
            mm_put_f32(out + lo, row, m, stream);
            uint32_t sgn = 0;
            if (fout != NULL) {
                for (Py_ssize_t j = 0; j < m; j++) frow[j] = (float)fsum[j];
                mm_put_f32(fout + lo, frow, m, stream);
                for (Py_ssize_t q = 0; q < nk; q++) {
                    const float *f = fs[q] + lo;
                    for (Py_ssize_t j = 0; j < m; j++) sgn |= mm_bits32(f[j]);
                }
            }
            if ((badsum & 0x8000000000000000ULL) || (sgn & 0x80000000u)) {
                mm_flag_nonfinite(xs, nk, lo, m, bad_x);
                if (fs != NULL) mm_flag_bad_weights(fs, nk, lo, m, bad_f);
            }
        }
    #if defined(__x86_64__)
        if (stream) _mm_sfence();  /* streaming stores visible before the join */
    #endif
    }

    static inline size_t mm_regmean_scratch(void)
    {
        return MM_RM_BLOCK * (3 * sizeof(double) + 2 * sizeof(float));
    }

    static void mm_regmean_par(const float *const *xs, const float *const *fs, const double *w, Py_ssize_t nk,
                               Py_ssize_t n, double lam, float *out, float *fout, uint32_t *tbad, int nt,
                               Py_ssize_t grain, char *scratch)
    {
        int stream = n >= MM_RM_STREAM_MIN;
        MM_PAR_BLOCKS(n, grain, nt, {
            uint32_t *mine = tbad + (Py_ssize_t)tid * 2 * nk;
            mm_regmean(xs, fs, w, nk, lo, hi, lam, out, fout, mine, mine + nk,
                       (double *)(scratch + (size_t)tid * mm_regmean_scratch()), stream);
        });
    }

    /* Element i (value t) into lane l: a = |t|, s1 += a, s2 += a log a (a = 0 takes log 1 = 0;
       selected by integer arithmetic on the bits, which keeps the loop branch-free). */
    #define MM_ABSLOG_STEP(t, l, xi) do { \
            double a_ = fabs(t); \
            uint64_t ua_; memcpy(&ua_, &a_, 8); \
            ua_ = ua_ | ((uint64_t)(ua_ == 0) << 52) * 0x3FFULL; \
            double one_or_a_; memcpy(&one_or_a_, &ua_, 8); \
            double la_ = mm_log_normal(one_or_a_, 0); \
            s1[l] = s1[l] + a_; \
            s2[l] = s2[l] + a_ * la_; \
            bx |= (mm_bits32(xi) & 0x7F800000u) + 0x00800000u; \
        } while (0)

    /* One span [lo, hi) of x (minus b): sums[0] = sum a, sums[1] = sum a log a, by 8 lanes.
       lo is a multiple of 8 (of MM_LOG_SPAN), so lane l of a group of 8 is element i + l. */
    MM_CLONES static void mm_abslog_span(const float *x, const float *b, Py_ssize_t lo, Py_ssize_t hi,
                                         double *sums, uint32_t *bad)
    {
        double s1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, s2[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        uint32_t bx = 0;
        Py_ssize_t i = lo;
        if (b != NULL) {
            for (; i + 8 <= hi; i += 8)
                for (int l = 0; l < 8; l++) MM_ABSLOG_STEP((double)x[i + l] - (double)b[i + l], l, x[i + l]);
            for (; i < hi; i++) MM_ABSLOG_STEP((double)x[i] - (double)b[i], (int)(i & 7), x[i]);
        } else {
            for (; i + 8 <= hi; i += 8)
                for (int l = 0; l < 8; l++) MM_ABSLOG_STEP((double)x[i + l], l, x[i + l]);
            for (; i < hi; i++) MM_ABSLOG_STEP((double)x[i], (int)(i & 7), x[i]);
        }
        double t1 = 0.0, t2 = 0.0;
        for (int l = 0; l < 8; l++) { t1 = t1 + s1[l]; t2 = t2 + s2[l]; }
        sums[0] = t1;
        sums[1] = t2;
        *bad |= bx;
    }

    /* Every span of every contributor; spans[(k * nspan + s) * 2 + 0/1]. Spans are the
       threads' unit of work. */
    static void mm_abslog_par(const float *const *xs, const float *b, Py_ssize_t nk, Py_ssize_t n,
                              double *spans, uint32_t *tbad, int nt)
    {
        Py_ssize_t nspan = (n + MM_LOG_SPAN - 1) / MM_LOG_SPAN;
        MM_PAR_BLOCKS(n, MM_LOG_SPAN, nt, {
            Py_ssize_t s = lo / MM_LOG_SPAN;
            for (Py_ssize_t k = 0; k < nk; k++)
                mm_abslog_span(xs[k], b, lo, hi, spans + (k * nspan + s) * 2, tbad + (Py_ssize_t)tid * nk + k);
        });
    }

    /* mag[e] = sum_k w_k |x_k[e] - b[e]| (float64, k in order) over [lo0, hi0); bad[k] bit 31
       if x_k is NaN/Inf there. */
    MM_CLONES static void mm_mean_abs(const float *const *xs, const float *b, const double *w, Py_ssize_t nk,
                                      Py_ssize_t lo0, Py_ssize_t hi0, double *mag, uint32_t *bad)
    {
        for (Py_ssize_t k = 0; k < nk; k++) {
            const float *x = xs[k];
            const double wk = w[k];
            uint32_t bx = 0;
            if (b != NULL) {
                for (Py_ssize_t e = lo0; e < hi0; e++) {
                    double a = fabs((double)x[e] - (double)b[e]) * wk;
                    mag[e] = k == 0 ? a : mag[e] + a;
                    bx |= (mm_bits32(x[e]) & 0x7F800000u) + 0x00800000u;
                }
            } else {
                for (Py_ssize_t e = lo0; e < hi0; e++) {
                    double a = fabs((double)x[e]) * wk;
                    mag[e] = k == 0 ? a : mag[e] + a;
                    bx |= (mm_bits32(x[e]) & 0x7F800000u) + 0x00800000u;
                }
            }
            bad[k] |= bx;
        }
    }

    static void mm_mean_abs_par(const float *const *xs, const float *b, const double *w, Py_ssize_t nk,
                                Py_ssize_t n, double *mag, uint32_t *tbad, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_mean_abs(xs, b, w, nk, lo, hi, mag, tbad + (Py_ssize_t)tid * nk);
        });
    }

    /* out[e] = float32(b[e] + 0.0) (0 without a base) wherever v[e] <= thr. */
    static void mm_keep_base(const double *v, double thr, const float *b, Py_ssize_t n, float *out)
    {
        for (Py_ssize_t e = 0; e < n; e++)
            if (v[e] <= thr) out[e] = b != NULL ? (float)((double)b[e] + 0.0) : 0.0f;
    }
    """
    void mm_regmean_par(const float** xs, const float** fs, const double* w, Py_ssize_t nk, Py_ssize_t n,
                        double lam, float* out, float* fout, uint32_t* tbad, int nt, Py_ssize_t grain,
                        char* scratch) nogil
    size_t mm_regmean_scratch() nogil
    void mm_abslog_par(const float** xs, const float* b, Py_ssize_t nk, Py_ssize_t n, double* spans,
                       uint32_t* tbad, int nt) nogil
    double mm_det_log(double a) nogil
    void mm_mean_abs_par(const float** xs, const float* b, const double* w, Py_ssize_t nk, Py_ssize_t n,
                         double* mag, uint32_t* tbad, int nt, Py_ssize_t grain) nogil
    void mm_keep_base(const double* v, double thr, const float* b, Py_ssize_t n, float* out) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil




def regmean_average(list xs, object fs, const double[::1] weights, double lam, float[::1] out,
                    object fout, int threads=0):
    """RegMean-style weighted average of one chunk into ``out`` (see the module docstring).

    ``fs``: the N companion float32 chunks, or None for the data-free form
    ``g_k = x_k^2 + lam``; ``fout`` (float32, same length) receives
    ``sum_k w_k f_k`` when ``fs`` is given. ``weights`` should be normalised by
    the caller. Returns ``(k, what)`` for the first contributor k whose chunk
    is bad, checking companions first: what 0 = a companion value is NaN, Inf
    or negative, 1 = a value is NaN or Inf; ``(-1, 0)`` if all are fine.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    cdef Py_ssize_t k, t
    cdef float[::1] fo
    cdef float* fop = NULL
    if nk == 0 or weights.shape[0] != nk:
        raise ValueError("xs and weights must be non-empty and match")
    if (fs is None) != (fout is None):
        raise ValueError("give both fs and fout, or neither")
    if fs is not None and len(fs) != nk:
        raise ValueError("fs must have one chunk per contributor")
    if n == 0:
        return -1, 0
    if fout is not None:
        fo = fout
        if fo.shape[0] != n:
            raise ValueError("fout must match out")
        fop = &fo[0]
    cdef const float** px = gather_new_f32(xs, n)
    cdef const float** pf = NULL
    cdef uint32_t* tbad = <uint32_t*>calloc(2 * nk * nt, sizeof(uint32_t))
    cdef char* scratch = <char*>malloc(nt * mm_regmean_scratch())
    try:
        if tbad == NULL or scratch == NULL:
            raise MemoryError()
        if fs is not None:
            pf = gather_new_f32(fs, n)
        with nogil:
            mm_regmean_par(px, pf, &weights[0], nk, n, lam, &out[0], fop, tbad, nt, grain, scratch)
        for k in range(nk):
            for t in range(1, nt):
                tbad[k] |= tbad[t * 2 * nk + k]
                tbad[nk + k] |= tbad[t * 2 * nk + nk + k]
            if tbad[nk + k] & NONFINITE:
                return k, 0
            if tbad[k] & NONFINITE:
                return k, 1
        return -1, 0
    finally:
        free(tbad)
        free(scratch)
        free(px)
        free(pf)


def abs_log_spans(list xs, object base, double[:, :, ::1] spans, int threads=0):
    """Per span of ``LOG_SPAN`` elements: ``spans[k, s] = (sum a, sum a log a)``, ``a = |x_k - base|``.

    The chunk must start at a multiple of ``LOG_SPAN`` in its tensor (only the
    last chunk may end elsewhere); ``spans`` has shape ``(N, ceil(n / LOG_SPAN), 2)``.
    Returns the first input holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        raise ValueError("no inputs")
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    cdef Py_ssize_t nspan = (n + LOG_SPAN - 1) // LOG_SPAN
    if spans.shape[0] != nk or spans.shape[1] != nspan or spans.shape[2] != 2:
        raise ValueError(f"spans must have shape ({nk}, {nspan}, 2)")
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, LOG_SPAN)
    if n == 0:
        return -1
    cdef const float** px = gather_new_f32(xs, n)
    cdef const float* b
    cdef uint32_t* tbad = <uint32_t*>calloc(nk * nt, sizeof(uint32_t))
    try:
        if tbad == NULL:
            raise MemoryError()
        b = optional_f32(base, n)
        with nogil:
            mm_abslog_par(px, b, nk, n, &spans[0, 0, 0], tbad, nt)
        return first_nonfinite(tbad, nk, nt)
    finally:
        free(tbad)
        free(px)


def det_log(double a):
    """The kernel's natural log of ``a > 0`` (exposed for tests and per-tensor scalars)."""
    if not a > 0.0 or a != a or a == float("inf"):
        raise ValueError("det_log needs a finite a > 0")
    return mm_det_log(a)


def mean_abs(list xs, object base, const double[::1] weights, double[::1] mag, int threads=0):
    """``mag = sum_k w_k |x_k - base|`` per element (float64, k in order; ``base`` None means 0).

    Returns the first input holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = mag.shape[0]
    cdef Py_ssize_t nk = len(xs)
    cdef Py_ssize_t grain = get_grain()
    cdef int nt = mm_team(threads if threads > 0 else get_threads(), n, grain)
    if nk == 0 or weights.shape[0] != nk:
        raise ValueError("xs and weights must be non-empty and match")
    if n == 0:
        return -1
    cdef const float** px = gather_new_f32(xs, n)
    cdef const float* b
    cdef uint32_t* tbad = <uint32_t*>calloc(nk * nt, sizeof(uint32_t))
    try:
        if tbad == NULL:
            raise MemoryError()
        b = optional_f32(base, n)
        with nogil:
            mm_mean_abs_par(px, b, &weights[0], nk, n, &mag[0], tbad, nt, grain)
        return first_nonfinite(tbad, nk, nt)
    finally:
        free(tbad)
        free(px)


def keep_base_at_most(const double[::1] values, double threshold, object base, float[::1] out):
    """Where ``values <= threshold``: ``out = float32(base + 0.0)`` (0 if ``base`` is None)."""
    cdef Py_ssize_t n = out.shape[0]
    if values.shape[0] != n:
        raise ValueError("values and out must have the same length")
    if n == 0:
        return
    cdef const float* b = optional_f32(base, n)
    with nogil:
        mm_keep_base(&values[0], threshold, b, n, &out[0])
