# cython: language_level=3
"""Kernels for the selective merges: SCE, nearswap and led_merge.

Each performs exactly the float64 operations, in exactly the order, of the
definitions documented in :mod:`meshmerge.crdt.strategies.elementwise` (each
``+ - * /`` exactly rounded, no contraction, sums over contributors
k = 0..N-1 from 0.0), so every element's bytes are the ones those definitions
give, for any chunking and thread count.

SCE's per-contributor energies are exact sums of float64 squares: each square
(rounded to float64 first) is added to a fixed-point superaccumulator, an
integer of 32-bit digits held in 64-bit limbs that covers every finite
non-negative double. Integer addition is associative, so per-thread partial
sums, chunks and tensors merge without error in any order; the total is
rounded to float64 once (nearest, ties to even), which is what ``math.fsum``
of the same squares returns.
"""

cimport numpy as cnp
from libc.stdlib cimport calloc, free, malloc
from libc.stdint cimport uint32_t, uint64_t

from meshmerge.cext._common cimport NONFINITE, gather_f32, optional_f32
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()


cdef extern from *:
    """
    #include <math.h>
    #include <stdlib.h>
    #include "mm_par.h"

    /* Exact sums of finite non-negative doubles. A double is mant * 2^(p - 1074) with
       mant < 2^53 and p = max(biased exponent - 1, 0) <= 2045, so it is the integer
       mant << p in units of 2^-1074: bits 0..2097. Digit i (32 bits, limb i) holds bits
       32i..32i+31. Values are first summed per exponent in integer bins (mantissas,
       < 2^64 for up to 2048 of them); a bin then spreads over three limbs, each part
       < 2^32, and carries are propagated by mm_xs_carry after every span, so limbs never
       overflow. 72 limbs = 2304 bits leave 206 bits of headroom for the count of terms.
       A NaN/Inf lands in limbs 63..65 (no out-of-bounds write); callers flag it. */
    #define MM_XS_LIMBS 72

    /* Propagate carries so every limb is a digit (< 2^32); the value is unchanged. */
    static void mm_xs_carry(uint64_t *acc)
    {
        uint64_t c = 0;
        for (int i = 0; i < MM_XS_LIMBS; i++) {
            uint64_t v = acc[i] + c;
            acc[i] = v & 0xFFFFFFFFULL;
            c = v >> 32;
        }
    }

    static inline int mm_xs_bit(const uint64_t *acc, int i)
    {
        return (int)((acc[i >> 5] >> (i & 31)) & 1);
    }

    /* The carried sum rounded to the nearest double, ties to even. */
    static double mm_xs_round(const uint64_t *acc)
    {
        int h = MM_XS_LIMBS - 1;
        while (h >= 0 && acc[h] == 0) h--;
        if (h < 0) return 0.0;
        int top = 32 * h + 63 - __builtin_clzll(acc[h]);
        if (top < 53) {
            /* < 2^53 units of 2^-1074: a subnormal or the smallest normal binade, exact. */
            return ldexp((double)(acc[0] | (acc[1] << 32)), -1074);
        }
        int r = top - 52;  /* bits below the 53 kept */
        uint64_t mant = 0;
        for (int i = top; i >= r; i--) mant = (mant << 1) | (uint64_t)mm_xs_bit(acc, i);
        int half = mm_xs_bit(acc, r - 1), sticky = 0;
        for (int i = r - 2; i >= 0 && !sticky; i--) sticky = mm_xs_bit(acc, i);
        if (half && (sticky || (mant & 1))) {
            mant++;
            if (mant >> 53) { mant >>= 1; r++; }
        }
        return ldexp((double)mant, r - 1074);
    }

    /* bit 31 set iff the float32 x is NaN or Inf (integer-only, vectorises). */
    static inline uint32_t mm_nonfinite(float x)
    {
        uint32_t bits;
        memcpy(&bits, &x, 4);
        return (bits & 0x7F800000u) + 0x00800000u;
    }

    #define MM_SEL_BLOCK 512

    /* SCE, select step on [lo0, hi0): t_k = x_k - b, m = (sum_k t_k) * inv_n,
       var = sum_k ((t_k - m)(t_k - m)). Contributor-major over blocks (per element
       the same order), so the inner loops vectorise. */
    MM_CLONES static void mm_sce_var(const float *const *xs, const float *b, Py_ssize_t nk, double inv_n,
                                     Py_ssize_t lo0, Py_ssize_t hi0, double *var, uint32_t *flags)
    {
        double m[MM_SEL_BLOCK], v[MM_SEL_BLOCK], bb[MM_SEL_BLOCK];
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SEL_BLOCK) {
            Py_ssize_t len = hi0 - i0 < MM_SEL_BLOCK ? hi0 - i0 : MM_SEL_BLOCK;
            for (Py_ssize_t j = 0; j < len; j++) {
                bb[j] = b != NULL ? (double)b[i0 + j] : 0.0;
                m[j] = 0.0;
                v[j] = 0.0;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    f |= mm_nonfinite(x[j]);
                    m[j] = m[j] + ((double)x[j] - bb[j]);
                }
                flags[k] |= f;
            }
            for (Py_ssize_t j = 0; j < len; j++) m[j] = m[j] * inv_n;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    double d = ((double)x[j] - bb[j]) - m[j];
                    v[j] = v[j] + d * d;
                }
            }
            for (Py_ssize_t j = 0; j < len; j++) var[i0 + j] = v[j];
        }
    }

    static void mm_sce_var_par(const float *const *xs, const float *b, Py_ssize_t nk, double inv_n, Py_ssize_t n,
                               double *var, uint32_t *tflags, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_sce_var(xs, b, nk, inv_n, lo, hi, var, tflags + (Py_ssize_t)tid * nk);
        });
    }

    /* Add the bins of exponents [lo, hi] to acc and clear them: bins[e] holds a sum of
       mantissas of doubles with biased exponent e (< 2^64), in units of 2^(p - 1074),
       p = max(e - 1, 0); it spreads over three limbs (from limb p / 32), each part < 2^32. */
    static void mm_xs_flush(uint64_t *acc, uint64_t *bins, int lo, int hi)
    {
        for (int e = lo; e <= hi; e++) {
            uint64_t m = bins[e];
            if (m == 0) continue;
            bins[e] = 0;
            int p = e > 0 ? e - 1 : 0;
            unsigned __int128 s = (unsigned __int128)m << (p & 31);
            uint64_t *a = acc + (p >> 5);
            a[0] += (uint64_t)s & 0xFFFFFFFFULL;
            a[1] += (uint64_t)(s >> 32) & 0xFFFFFFFFULL;
            a[2] += (uint64_t)(s >> 64);  /* < 2^31: m < 2^64 shifted by at most 31 */
        }
    }

    /* SCE, calculate step on [lo0, hi0): add t_k * t_k (rounded to double) of the
       selected elements (var == NULL: all; else var >= thr; others add 0.0, which
       changes nothing and costs no mispredicted branch) exactly to contributor k's
       accumulator acc + k * MM_XS_LIMBS. Per span, each square's 53-bit mantissa is
       added to the integer bin of its exponent (one add, no shifts; 2048 of them fit
       in 64 bits), then the touched bins go to the accumulator, which is carried. */
    #define MM_BIN_SPAN 2048
    static void mm_sce_energy(const float *const *xs, const float *b, Py_ssize_t nk, const double *var,
                              double thr, Py_ssize_t lo0, Py_ssize_t hi0, uint64_t *acc, uint32_t *flags)
    {
        uint64_t bins[2048];
        memset(bins, 0, sizeof(bins));
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_BIN_SPAN) {
            Py_ssize_t len = hi0 - i0 < MM_BIN_SPAN ? hi0 - i0 : MM_BIN_SPAN;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                uint32_t f = 0;
                uint64_t emin = 2047, emax = 0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    f |= mm_nonfinite(x[j]);
                    double t = b != NULL ? (double)x[j] - (double)b[i0 + j] : (double)x[j];
                    double v = t * t;
                    if (var != NULL) v = var[i0 + j] >= thr ? v : 0.0;
                    uint64_t bits;
                    memcpy(&bits, &v, 8);
                    uint64_t e = (bits >> 52) & 0x7FF;  /* a NaN may carry a sign bit */
                    bins[e] += (bits & 0xFFFFFFFFFFFFFULL) | ((uint64_t)(e != 0) << 52);
                    /* a zero adds nothing, and must not widen the range of bins to flush */
                    uint64_t elo = bits != 0 ? e : 2047;
                    emin = elo < emin ? elo : emin;
                    emax = e > emax ? e : emax;
                }
                flags[k] |= f;
                if (emin <= emax) {
                    uint64_t *a = acc + k * MM_XS_LIMBS;
                    mm_xs_flush(a, bins, (int)emin, (int)emax);
                    mm_xs_carry(a);
                }
            }
        }
    }

    static void mm_sce_energy_par(const float *const *xs, const float *b, Py_ssize_t nk, const double *var,
                                  double thr, Py_ssize_t n, uint64_t *tacc, uint32_t *tflags, int nt,
                                  Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_sce_energy(xs, b, nk, var, thr, lo, hi, tacc + (Py_ssize_t)tid * nk * MM_XS_LIMBS,
                          tflags + (Py_ssize_t)tid * nk);
        });
    }

    /* SCE, erase step on [lo0, hi0): s = sum_k c_k t_k; over k, where selected and
       sign(t_k) == sign(s) != 0: num += c_k t_k, den += c_k (else + 0.0);
       out = (float)(b + num / (den == 0 ? 1 : den)). */
    MM_CLONES static void mm_sce_combine(const float *const *xs, const float *b, const double *c, Py_ssize_t nk,
                                         const double *var, double thr, Py_ssize_t lo0, Py_ssize_t hi0,
                                         float *out, uint32_t *flags)
    {
        double s[MM_SEL_BLOCK], num[MM_SEL_BLOCK], den[MM_SEL_BLOCK], bb[MM_SEL_BLOCK];
        int64_t sel[MM_SEL_BLOCK];  /* as wide as a double, so the mixed loop vectorises */
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SEL_BLOCK) {
            Py_ssize_t len = hi0 - i0 < MM_SEL_BLOCK ? hi0 - i0 : MM_SEL_BLOCK;
            for (Py_ssize_t j = 0; j < len; j++) {
                bb[j] = b != NULL ? (double)b[i0 + j] : 0.0;
                sel[j] = var == NULL || var[i0 + j] >= thr;
                s[j] = 0.0;
                num[j] = 0.0;
                den[j] = 0.0;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                const double ck = c[k];
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    f |= mm_nonfinite(x[j]);
                    s[j] = s[j] + ck * ((double)x[j] - bb[j]);
                }
                flags[k] |= f;
            }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                const double ck = c[k];
                for (Py_ssize_t j = 0; j < len; j++) {
                    double t = (double)x[j] - bb[j];
                    /* & and | (no short circuit): no branches, the loop vectorises */
                    int64_t agree = sel[j] & (((t > 0.0) & (s[j] > 0.0)) | ((t < 0.0) & (s[j] < 0.0)));
                    num[j] = num[j] + (agree ? ck * t : 0.0);
                    den[j] = den[j] + (agree ? ck : 0.0);
                }
            }
            for (Py_ssize_t j = 0; j < len; j++)
                out[i0 + j] = (float)(bb[j] + num[j] / (den[j] == 0.0 ? 1.0 : den[j]));
        }
    }

    static void mm_sce_combine_par(const float *const *xs, const float *b, const double *c, Py_ssize_t nk,
                                   const double *var, double thr, Py_ssize_t n, float *out, uint32_t *tflags,
                                   int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, {
            mm_sce_combine(xs, b, c, nk, var, thr, lo, hi, out, tflags + (Py_ssize_t)tid * nk);
        });
    }

    /* nearswap on [lo, hi): t = x - b, d = |t|, w = 1 where d == 0 else min(1, tt / d),
       out = (float)(w (t + b) + (1 - w) b). */
    MM_CLONES static void mm_nearswap(const float *x, const float *b, double tt, Py_ssize_t lo, Py_ssize_t hi,
                                      float *out, uint32_t *flag)
    {
        uint32_t f = 0;
        for (Py_ssize_t e = lo; e < hi; e++) {
            f |= mm_nonfinite(x[e]);
            double bb = (double)b[e];
            double t = (double)x[e] - bb;
            double d = fabs(t);
            double q = tt / (d == 0.0 ? 1.0 : d);
            double w = d == 0.0 ? 1.0 : (q < 1.0 ? q : 1.0);
            out[e] = (float)(w * (t + bb) + (1.0 - w) * bb);
        }
        *flag |= f;
    }

    static void mm_nearswap_par(const float *x, const float *b, double tt, Py_ssize_t n, float *out,
                                uint32_t *tflags, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, { mm_nearswap(x, b, tt, lo, hi, out, tflags + tid); });
    }

    /* led_merge on [lo0, hi0): mean = sum_k wn_k x_k; out = the x_k with the smallest
       |x_k - mean|, among equal distances the smallest value, among equal values the
       first (k in order). */
    MM_CLONES static void mm_led(const float *const *xs, const double *wn, Py_ssize_t nk, Py_ssize_t lo0,
                                 Py_ssize_t hi0, float *out, uint32_t *flags)
    {
        double mean[MM_SEL_BLOCK], dist[MM_SEL_BLOCK], best[MM_SEL_BLOCK];
        for (Py_ssize_t i0 = lo0; i0 < hi0; i0 += MM_SEL_BLOCK) {
            Py_ssize_t len = hi0 - i0 < MM_SEL_BLOCK ? hi0 - i0 : MM_SEL_BLOCK;
            for (Py_ssize_t j = 0; j < len; j++) mean[j] = 0.0;
            for (Py_ssize_t k = 0; k < nk; k++) {
                const float *x = xs[k] + i0;
                const double w = wn[k];
                uint32_t f = 0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    f |= mm_nonfinite(x[j]);
                    mean[j] = mean[j] + w * (double)x[j];
                }
                flags[k] |= f;
            }
            const float *x0 = xs[0] + i0;
            for (Py_ssize_t j = 0; j < len; j++) {
                best[j] = (double)x0[j];
                dist[j] = fabs(best[j] - mean[j]);
            }
            for (Py_ssize_t k = 1; k < nk; k++) {
                const float *x = xs[k] + i0;
                for (Py_ssize_t j = 0; j < len; j++) {
                    double v = (double)x[j];
                    double d = fabs(v - mean[j]);
                    int better = d < dist[j] || (d == dist[j] && v < best[j]);
                    best[j] = better ? v : best[j];
                    dist[j] = better ? d : dist[j];
                }
            }
            for (Py_ssize_t j = 0; j < len; j++) out[i0 + j] = (float)best[j];
        }
    }

    static void mm_led_par(const float *const *xs, const double *wn, Py_ssize_t nk, Py_ssize_t n, float *out,
                           uint32_t *tflags, int nt, Py_ssize_t grain)
    {
        MM_PAR_BLOCKS(n, grain, nt, { mm_led(xs, wn, nk, lo, hi, out, tflags + (Py_ssize_t)tid * nk); });
    }
    """
    enum: MM_XS_LIMBS
    void mm_xs_carry(uint64_t* acc) nogil
    double mm_xs_round(const uint64_t* acc) nogil
    int mm_team(int want, Py_ssize_t n, Py_ssize_t grain) nogil
    void mm_sce_var_par(const float** xs, const float* b, Py_ssize_t nk, double inv_n, Py_ssize_t n,
                        double* var, uint32_t* tflags, int nt, Py_ssize_t grain) nogil
    void mm_sce_energy_par(const float** xs, const float* b, Py_ssize_t nk, const double* var, double thr,
                           Py_ssize_t n, uint64_t* tacc, uint32_t* tflags, int nt, Py_ssize_t grain) nogil
    void mm_sce_combine_par(const float** xs, const float* b, const double* c, Py_ssize_t nk, const double* var,
                            double thr, Py_ssize_t n, float* out, uint32_t* tflags, int nt, Py_ssize_t grain) nogil
    void mm_nearswap_par(const float* x, const float* b, double tt, Py_ssize_t n, float* out, uint32_t* tflags,
                         int nt, Py_ssize_t grain) nogil
    void mm_led_par(const float** xs, const double* wn, Py_ssize_t nk, Py_ssize_t n, float* out,
                    uint32_t* tflags, int nt, Py_ssize_t grain) nogil


#: Limbs of one exact accumulator (``acc`` rows of :func:`sce_energy`).
EXACT_LIMBS = MM_XS_LIMBS


cdef class _Call:
    """Pointers and per-thread flags of one kernel call over N float32 inputs of n elements."""

    cdef const float** xs
    cdef uint32_t* tflags
    cdef Py_ssize_t nk, n, grain
    cdef int nt

    def __cinit__(self, list xs, Py_ssize_t n, int threads):
        self.nk = len(xs)
        self.n = n
        self.grain = get_grain()
        self.nt = mm_team(threads if threads > 0 else get_threads(), n, self.grain)
        if self.nk == 0:
            raise ValueError("no inputs")
        self.xs = <const float**>malloc(self.nk * sizeof(float*))
        self.tflags = <uint32_t*>calloc(self.nk * self.nt, sizeof(uint32_t))
        if self.xs == NULL or self.tflags == NULL:
            raise MemoryError()
        gather_f32(xs, n, self.xs)

    def __dealloc__(self):
        free(self.xs)
        free(self.tflags)

    cdef Py_ssize_t first_bad(self):
        """The first input k (in order) that held NaN or Inf on any thread, or -1."""
        cdef Py_ssize_t k, t
        for k in range(self.nk):
            for t in range(self.nt):
                if self.tflags[t * self.nk + k] & NONFINITE:
                    return k
        return -1


cdef const double* _selection(object var, Py_ssize_t n) except? NULL:
    """Data pointer of an optional float64 variance array of n elements (None gives NULL)."""
    cdef cnp.ndarray arr
    if var is None:
        return NULL
    arr = var
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT64 or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError("var must be a C-contiguous float64 array")
    if cnp.PyArray_SIZE(arr) != n:
        raise ValueError(f"var has {cnp.PyArray_SIZE(arr)} elements, expected {n}")
    return <const double*>cnp.PyArray_DATA(arr)


def sce_variance(list xs, object base, double inv_n, double[::1] var, int threads=0):
    """SCE's select statistic over one chunk, per element in float64 with k = 0..N-1:
    ``t_k = x_k - b``, ``m = (sum t_k) * inv_n``, ``var = sum (t_k - m)(t_k - m)``.

    ``xs`` float32 chunks, ``base`` float32 or None (0). Returns the first input
    holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = var.shape[0]
    cdef _Call call = _Call(xs, n, threads)
    cdef const float* b = optional_f32(base, n)
    if n:
        with nogil:
            mm_sce_var_par(call.xs, b, call.nk, inv_n, n, &var[0], call.tflags, call.nt, call.grain)
    return call.first_bad()


def sce_energy(list xs, object base, object var, double thr, uint64_t[:, ::1] acc, int threads=0):
    """Add ``t_k * t_k`` (``t_k = x_k - b`` in float64, the square rounded to float64)
    over the chunk's selected elements exactly to row k of ``acc``.

    Selected: every element if ``var`` is None, else those with ``var >= thr``.
    ``acc`` has shape (N, EXACT_LIMBS), starts as zeros and may run over any
    number of chunks in any order; :func:`exact_round` gives the sums. Returns the
    first input holding NaN/Inf (``acc`` is then meaningless), or -1.
    """
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size if xs else 0
    cdef _Call call = _Call(xs, n, threads)
    cdef const float* b = optional_f32(base, n)
    cdef const double* v = _selection(var, n)
    cdef Py_ssize_t k, t, i, limbs = MM_XS_LIMBS
    cdef uint64_t* tacc
    if acc.shape[0] != call.nk or acc.shape[1] != limbs:
        raise ValueError(f"acc must have shape ({call.nk}, {limbs})")
    if n == 0:
        return -1
    tacc = <uint64_t*>calloc(call.nt * call.nk * limbs, sizeof(uint64_t))
    if tacc == NULL:
        raise MemoryError()
    try:
        with nogil:
            mm_sce_energy_par(call.xs, b, call.nk, v, thr, n, tacc, call.tflags, call.nt, call.grain)
            for k in range(call.nk):
                for t in range(call.nt):
                    for i in range(limbs):
                        acc[k, i] += tacc[(t * call.nk + k) * limbs + i]
                mm_xs_carry(&acc[k, 0])
        return call.first_bad()
    finally:
        free(tacc)


def exact_round(const uint64_t[:, ::1] acc):
    """The sums held by the rows of an :func:`sce_energy` accumulator, each rounded to
    the nearest float64 (ties to even) once."""
    cdef Py_ssize_t k, i
    cdef list out = []
    if acc.shape[1] != MM_XS_LIMBS:
        raise ValueError(f"acc rows must have {MM_XS_LIMBS} limbs")
    for k in range(acc.shape[0]):
        for i in range(MM_XS_LIMBS):
            if acc[k, i] >> 32:
                raise ValueError("acc is not carried (a limb exceeds 32 bits)")
        out.append(mm_xs_round(&acc[k, 0]))
    return out


def sce_combine(list xs, object base, object var, double thr, const double[::1] coef, float[::1] out,
                int threads=0):
    """SCE's erase step over one chunk: ``s = sum c_k t_k``; over the selected elements
    (as :func:`sce_energy`) the ``t_k`` whose sign is that of ``s`` give
    ``num = sum c_k t_k`` and ``den = sum c_k``; ``out = float32(b + num / den)``
    (``den`` 0 counts as 1). Returns the first input holding NaN/Inf, or -1.
    """
    cdef Py_ssize_t n = out.shape[0]
    cdef _Call call = _Call(xs, n, threads)
    cdef const float* b = optional_f32(base, n)
    cdef const double* v = _selection(var, n)
    if coef.shape[0] != call.nk:
        raise ValueError(f"{call.nk} inputs but {coef.shape[0]} coefficients")
    if n:
        with nogil:
            mm_sce_combine_par(call.xs, b, &coef[0], call.nk, v, thr, n, &out[0], call.tflags, call.nt,
                               call.grain)
    return call.first_bad()


def nearswap_merge(object x, object base, double t, float[::1] out, int threads=0):
    """nearswap over one chunk: ``d = |x - b|``, ``w = 1`` where ``d == 0`` else
    ``min(1, t / d)``, ``out = float32(w ((x - b) + b) + (1 - w) b)`` in float64.
    Returns 0 if ``x`` holds NaN/Inf, else -1."""
    cdef Py_ssize_t n = out.shape[0]
    cdef _Call call = _Call([x], n, threads)
    if base is None:
        raise ValueError("nearswap needs the base")
    cdef const float* b = optional_f32(base, n)
    if n:
        with nogil:
            mm_nearswap_par(call.xs[0], b, t, n, &out[0], call.tflags, call.nt, call.grain)
    return call.first_bad()


def led_select(list xs, const double[::1] wn, float[::1] out, int threads=0):
    """led_merge over one chunk: per element the ``x_k`` closest to ``sum wn_k x_k``
    (float64, k in order), ties to the smaller value, then to the lower k.
    Returns the first input holding NaN/Inf, or -1."""
    cdef Py_ssize_t n = out.shape[0]
    cdef _Call call = _Call(xs, n, threads)
    if wn.shape[0] != call.nk:
        raise ValueError(f"{call.nk} inputs but {wn.shape[0]} weights")
    if n:
        with nogil:
            mm_led_par(call.xs, &wn[0], call.nk, n, &out[0], call.tflags, call.nt, call.grain)
    return call.first_bad()
