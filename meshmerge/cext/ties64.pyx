# cython: language_level=3
"""TIES on float64 coordinate matrices (``svd_knot_tying``'s merge of the per-task
coordinates in the shared basis).

Definition (the numpy formulation it replaces, kept in the tests as reference):
each task's matrix ``v_k`` is trimmed to the entries whose magnitude is at least
its ``keep``-th largest magnitude (``keep = max(1, ceil(density * size))``; no
trim when ``keep >= size``); then per element, in float64, ``k`` ascending:
``total = (...(0 + w_0 t_0) + w_1 t_1 ...)``, the elected sign is
``sign(total)``, ``num``/``den`` sum ``w_k t_k``/``w_k`` over the tasks whose
non-zero ``t_k`` has that sign, and the result is ``num / den`` (0 where
``den`` is 0). The threshold is the exact order statistic (a 16-bit radix
select on the magnitudes' bit patterns, which order like the values), so the
bytes are those of the numpy code; tasks (thresholds) and then elements are
split over threads (disjoint, so the thread count changes no byte).
"""

import math

import numpy as np
cimport numpy as cnp
from libc.stdlib cimport free, malloc

from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include <stdlib.h>
    #include "mm_par.h"

    #define MM_TB 256  /* elements per block of the elect/mean pass (its sums stay in L1) */

    #define MM_TIES_CAND (1 << 20)  /* most bucket values gathered per thread (8 MiB) */

    static inline uint64_t mm_abs_bits(const double *v, Py_ssize_t e)
    {
        uint64_t bits;
        memcpy(&bits, &v[e], 8);
        return bits & 0x7FFFFFFFFFFFFFFFull;
    }

    /* The k-th smallest (0-based) of |v[0..n)| (finite v; *bad = 1 otherwise). Non-negative
       doubles order like their bit patterns: one counting pass over the top 16 bits, then the
       values in the bucket holding the answer are gathered into cand (capacity cap) and three
       more 16-bit counting passes run over those only (over all of v, filtered by the bits
       fixed so far, when the bucket holds cap values or more). hist: 65536 entries. */
    static double mm_kth_abs(const double *v, Py_ssize_t n, Py_ssize_t k, uint32_t *hist, uint64_t *cand,
                             Py_ssize_t cap, int *bad)
    {
        uint64_t worst = 0;
        memset(hist, 0, 65536 * sizeof(uint32_t));
        for (Py_ssize_t e = 0; e < n; e++) {
            uint64_t bits = mm_abs_bits(v, e);
            worst = bits > worst ? bits : worst;
            hist[bits >> 48]++;
        }
        if (worst >= 0x7FF0000000000000ull) { *bad = 1; return 0.0; }
        uint64_t d = 0;
        while ((Py_ssize_t)hist[d] <= k) { k -= (Py_ssize_t)hist[d]; d++; }
        uint64_t prefix = d;
        Py_ssize_t m = (Py_ssize_t)hist[d];
        const int gathered = m < cap;
        if (gathered) {
            m = 0;
            for (Py_ssize_t e = 0; e < n; e++) {
                uint64_t bits = mm_abs_bits(v, e);
                cand[m] = bits;  /* m <= bucket count < cap: in bounds */
                m += (bits >> 48) == prefix;
            }
        }
        for (int level = 1; level < 4; level++) {
            const int sh = 48 - 16 * level;
            memset(hist, 0, 65536 * sizeof(uint32_t));
            if (gathered) {
                for (Py_ssize_t i = 0; i < m; i++) hist[(cand[i] >> sh) & 0xFFFF]++;
            } else {
                for (Py_ssize_t e = 0; e < n; e++) {
                    uint64_t bits = mm_abs_bits(v, e);
                    if ((bits >> (sh + 16)) == prefix) hist[(bits >> sh) & 0xFFFF]++;
                }
            }
            d = 0;
            while ((Py_ssize_t)hist[d] <= k) { k -= (Py_ssize_t)hist[d]; d++; }
            prefix = (prefix << 16) | d;
            if (gathered) {
                Py_ssize_t kept = 0;
                for (Py_ssize_t i = 0; i < m; i++) {
                    cand[kept] = cand[i];
                    kept += (cand[i] >> sh) == prefix;
                }
                m = kept;
            }
        }
        double r;
        memcpy(&r, &prefix, 8);
        return r;
    }

    /* thr[k] = the (n - keep)-th smallest |vs[k]| (0.0: no trim when keep >= n), tasks split
       over threads; bad[k] = 1 if vs[k] holds a NaN or Inf. Returns -1 if out of memory. */
    static int mm_ties64_thresholds(const double *const *vs, Py_ssize_t nk, Py_ssize_t n, Py_ssize_t keep,
                                    double *thr, int *bad, int want, Py_ssize_t grain)
    {
        int nt = mm_team(want, nk * n, grain);
        if (nt > nk) nt = (int)nk;
        if (nt < 1) nt = 1;
        uint32_t *hist = malloc((size_t)nt * 65536 * sizeof(uint32_t));
        Py_ssize_t cap = n < MM_TIES_CAND ? n : MM_TIES_CAND;
        uint64_t *cand = malloc((size_t)nt * (size_t)cap * sizeof(uint64_t));
        if (hist == NULL || cand == NULL) { free(hist); free(cand); return -1; }
        MM_PAR_BLOCKS(nk, 1, nt, {
            (void)hi;
            bad[lo] = 0;
            thr[lo] = 0.0;
            if (keep < n)
                thr[lo] = mm_kth_abs(vs[lo], n, n - keep, hist + (size_t)tid * 65536,
                                     cand + (size_t)tid * (size_t)cap, cap, &bad[lo]);
            else
                for (Py_ssize_t e = 0; e < n; e++) bad[lo] |= !(fabs(vs[lo][e]) <= 1.7976931348623157e308);
        });
        free(hist);
        free(cand);
        return 0;
    }

    /* Elements [lo, hi) in blocks of MM_TB, each pass over the tasks in order: trim by thr[k],
       total = total + w_k t_k; then num/den = num/den + (agreeing ? w_k t_k / w_k : 0.0), the
       exact operations of the numpy formulation (which adds 0.0 where a task disagrees);
       branch-free so the random signs cost no mispredictions. */
    MM_CLONES static void mm_ties64_range(const double *const *vs, const double *w, const double *thr,
                                          Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t hi, double *out)
    {
        double total[MM_TB], num[MM_TB], den[MM_TB];
        for (Py_ssize_t e0 = lo; e0 < hi; e0 += MM_TB) {
            Py_ssize_t m = hi - e0 < MM_TB ? hi - e0 : MM_TB;
            for (Py_ssize_t j = 0; j < m; j++) { total[j] = 0.0; num[j] = 0.0; den[j] = 0.0; }
            for (Py_ssize_t k = 0; k < nk; k++) {
                const double *x = vs[k] + e0;
                const double wk = w[k], th = thr[k];
                for (Py_ssize_t j = 0; j < m; j++) {
                    double t = fabs(x[j]) >= th ? x[j] : 0.0;
                    total[j] = total[j] + wk * t;
                }
            }
            /* sign(total) as +-1 (0 for 0 and NaN, where nothing agrees); a kept t agrees iff
               t * sign > 0 (multiplying by +-1 or 0 is exact). */
            for (Py_ssize_t j = 0; j < m; j++) total[j] = total[j] > 0.0 ? 1.0 : (total[j] < 0.0 ? -1.0 : 0.0);
            for (Py_ssize_t k = 0; k < nk; k++) {
                const double *x = vs[k] + e0;
                const double wk = w[k], th = thr[k];
                for (Py_ssize_t j = 0; j < m; j++) {
                    double t = fabs(x[j]) >= th ? x[j] : 0.0;
                    int agree = t * total[j] > 0.0;
                    num[j] = num[j] + (agree ? wk * t : 0.0);
                    den[j] = den[j] + (agree ? wk : 0.0);
                }
            }
            for (Py_ssize_t j = 0; j < m; j++) out[e0 + j] = den[j] > 0.0 ? num[j] / den[j] : 0.0;
        }
    }

    static void mm_ties64(const double *const *vs, const double *w, const double *thr, Py_ssize_t nk,
                          Py_ssize_t n, double *out, int want, Py_ssize_t grain)
    {
        Py_ssize_t g = (grain / (nk > 0 ? nk : 1) + MM_TB) / MM_TB * MM_TB;
        int nt = mm_team(want, n, g);
        MM_PAR_BLOCKS(n, g, nt, { (void)tid; mm_ties64_range(vs, w, thr, nk, lo, hi, out); });
    }
    """
    int mm_ties64_thresholds(const double *const *vs, Py_ssize_t nk, Py_ssize_t n, Py_ssize_t keep,
                             double *thr, int *bad, int want, Py_ssize_t grain) nogil
    void mm_ties64(const double *const *vs, const double *w, const double *thr, Py_ssize_t nk,
                   Py_ssize_t n, double *out, int want, Py_ssize_t grain) nogil


def ties_coordinates(list vs, weights, double density):
    """TIES of same-shaped finite float64 matrices ``vs`` with ``weights`` (see above).

    Raises ValueError on mismatched shapes, a NaN/Inf entry, a weight count that
    differs from ``len(vs)`` or density outside (0, 1].
    """
    cdef Py_ssize_t nk = len(vs)
    if nk == 0:
        raise ValueError("ties_coordinates needs at least one matrix")
    if len(weights) != nk:
        raise ValueError(f"ties_coordinates: {len(weights)} weights for {nk} matrices")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    shape = np.shape(vs[0])
    arrs = [np.ascontiguousarray(v, dtype=np.float64) for v in vs]
    for a in arrs:
        if a.shape != shape:
            raise ValueError(f"ties_coordinates: shapes {shape} and {a.shape} differ")
    cdef Py_ssize_t n = arrs[0].size
    out = np.zeros(shape, dtype=np.float64)
    if n == 0:
        return out
    cdef double[::1] w = np.array([float(x) for x in weights], dtype=np.float64)
    cdef double[::1] thr = np.zeros(nk, dtype=np.float64)
    cdef int[::1] bad = np.zeros(nk, dtype=np.intc)
    cdef double[::1] ov = out.reshape(-1)
    cdef const double[::1] vk
    cdef Py_ssize_t keep = max(1, math.ceil(density * n))
    cdef int want = get_threads()
    cdef Py_ssize_t grain = get_grain()
    cdef int rc
    cdef Py_ssize_t k
    cdef const double **ptrs = <const double **>malloc(nk * sizeof(double *))
    if ptrs == NULL:
        raise MemoryError()
    try:
        for k in range(nk):
            vk = arrs[k].reshape(-1)
            ptrs[k] = &vk[0]
        with nogil:
            rc = mm_ties64_thresholds(ptrs, nk, n, keep, &thr[0], &bad[0], want, grain)
        if rc != 0:
            raise MemoryError()
        for k in range(nk):
            if bad[k]:
                raise ValueError(f"ties_coordinates: matrix {k} holds NaN or Inf")
        with nogil:
            mm_ties64(ptrs, &w[0], &thr[0], nk, n, &ov[0], want, grain)
    finally:
        free(ptrs)
    return out
