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
``den`` is 0). The threshold is the exact order statistic
(:func:`meshmerge.cext.elemwise.kth_smallest_nonnegative`), so the bytes are
those of the numpy code; elements are split over threads (disjoint, so the
thread count changes no byte).
"""

import math

import numpy as np
cimport numpy as cnp
from libc.stdlib cimport free, malloc

from meshmerge.cext.elemwise import kth_smallest_nonnegative
from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <math.h>
    #include "mm_par.h"

    /* dst = |v| over n elements; returns 1 if v holds a NaN or Inf. */
    static int mm_abs_f64(const double *v, Py_ssize_t n, double *dst)
    {
        int bad = 0;
        for (Py_ssize_t e = 0; e < n; e++) {
            double a = fabs(v[e]);
            bad |= !(a <= 1.7976931348623157e308);
            dst[e] = a;
        }
        return bad;
    }

    static inline double mm_sign(double x)
    {
        return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x * 0.0);
    }

    /* Elements [lo, hi): trim by thr[k], elect, weighted mean of the agreeing entries. */
    MM_CLONES static void mm_ties64_range(const double *const *vs, const double *w, const double *thr,
                                          Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t hi, double *out)
    {
        for (Py_ssize_t e = lo; e < hi; e++) {
            double total = 0.0;
            for (Py_ssize_t k = 0; k < nk; k++) {
                double x = vs[k][e];
                double t = fabs(x) >= thr[k] ? x : 0.0;
                total = total + w[k] * t;
            }
            double sg = mm_sign(total), num = 0.0, den = 0.0;
            for (Py_ssize_t k = 0; k < nk; k++) {
                double x = vs[k][e];
                double t = fabs(x) >= thr[k] ? x : 0.0;
                if (t != 0.0 && mm_sign(t) == sg) {
                    num = num + w[k] * t;
                    den = den + w[k];
                }
            }
            out[e] = den > 0.0 ? num / den : 0.0;
        }
    }

    static void mm_ties64(const double *const *vs, const double *w, const double *thr, Py_ssize_t nk,
                          Py_ssize_t n, double *out, int want, Py_ssize_t grain)
    {
        Py_ssize_t g = grain / (nk > 0 ? nk : 1) + 1;
        int nt = mm_team(want, n, g);
        MM_PAR_BLOCKS(n, g, nt, { (void)tid; mm_ties64_range(vs, w, thr, nk, lo, hi, out); });
    }
    """
    int mm_abs_f64(const double *v, Py_ssize_t n, double *dst) nogil
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
    cdef double[::1] mag = np.empty(n, dtype=np.float64)
    cdef double[::1] vk
    cdef Py_ssize_t keep = max(1, math.ceil(density * n))
    cdef int bad
    cdef Py_ssize_t k
    for k in range(nk):
        vk = arrs[k].reshape(-1)
        with nogil:
            bad = mm_abs_f64(&vk[0], n, &mag[0])
        if bad:
            raise ValueError(f"ties_coordinates: matrix {k} holds NaN or Inf")
        if keep < n:
            thr[k] = kth_smallest_nonnegative(mag, n - keep)
    cdef const double **ptrs = <const double **>malloc(nk * sizeof(double *))
    if ptrs == NULL:
        raise MemoryError()
    cdef double[::1] ov = out.reshape(-1)
    cdef int want = get_threads()
    cdef Py_ssize_t grain = get_grain()
    try:
        for k in range(nk):
            vk = arrs[k].reshape(-1)
            ptrs[k] = &vk[0]
        with nogil:
            mm_ties64(ptrs, &w[0], &thr[0], nk, n, &ov[0], want, grain)
    finally:
        free(ptrs)
    return out
