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

    Counts go to a local uint32 table first (half the cache footprint of
    uint64; a call covers fewer than 2^32 elements) and are added to ``hist``
    at the end. Returns the index of the first input with NaN/Inf, or -1.
    """
    cdef Py_ssize_t nk = len(xs)
    if nk == 0:
        return -1
    cdef Py_ssize_t n = (<cnp.ndarray>xs[0]).size
    if n >= 0xFFFFFFFF:
        raise ValueError("chunk too large for 32-bit counts")
    cdef _Ptrs ptrs = _Ptrs(xs, n)
    cdef const float* b = optional_f32(base, n)
    cdef Py_ssize_t k, i
    cdef const float* p
    cdef float a
    cdef uint32_t f
    cdef int bad = -1
    if hist.shape[0] != nk or hist.shape[1] != HI_BINS:
        raise ValueError("hist must have shape (N, 65536)")
    cdef uint32_t* local = <uint32_t*>calloc(HI_BINS, sizeof(uint32_t))
    cdef cnp.uint64_t* hk
    if local == NULL:
        raise MemoryError()
    try:
        with nogil:
            for k in range(nk):
                p = ptrs.p[k]
                f = 0
                if b == NULL:
                    for i in range(n):
                        f = f | nonfinite_bits(p[i])
                        local[(f32_bits(p[i]) & 0x7FFFFFFFu) >> 15] += 1
                else:
                    for i in range(n):
                        a = <float>fabs(<double>p[i] - <double>b[i])
                        f = f | nonfinite_bits(p[i])
                        local[f32_bits(a) >> 15] += 1
                if (f & NONFINITE) and bad < 0:
                    bad = k
                hk = &hist[k, 0]
                for i in range(HI_BINS):
                    hk[i] += local[i]
                    local[i] = 0
        return bad
    finally:
        free(local)


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
    cdef uint32_t* flags = <uint32_t*>malloc(nk * sizeof(uint32_t))
    cdef double s[BLOCK]
    cdef double num[BLOCK]
    cdef double den[BLOCK]
    cdef double bb[BLOCK]
    cdef Py_ssize_t k, j, i0, m
    cdef const float* p
    cdef double t, v, e, wk
    cdef double* vk
    cdef uint64_t key, pos, gi, z = 0, u
    cdef double g
    cdef float a, lok, hik
    cdef uint32_t f
    cdef int bad = -1
    if vals == NULL or flags == NULL:
        free(vals); free(flags)
        raise MemoryError()
    try:
        with nogil:
            for k in range(nk):
                flags[k] = 0
            i0 = 0
            while i0 < n:
                m = min(<Py_ssize_t>BLOCK, n - i0)
                for j in range(m):
                    bb[j] = 0.0 if b == NULL else <double>b[i0 + j]
                    s[j] = 0.0
                    num[j] = 0.0
                    den[j] = 0.0
                # Phase 1: kept (trimmed, dropped, rescaled) task values and the sign tally.
                # Each loop is branch-free per element so the compiler can vectorise it.
                for k in range(nk):
                    p = ptrs.p[k] + i0
                    vk = vals + k * BLOCK
                    lok = lo[k]
                    hik = hi[k]
                    wk = w[k]
                    f = 0
                    for j in range(m):
                        f = f | nonfinite_bits(p[j])
                        t = <double>p[j] - bb[j]
                        a = <float>fabs(t)
                        vk[j] = (t * rescale) * <double>((a >= lok) & (a < hik))
                    flags[k] = flags[k] | f
                    if kp != NULL:
                        key = kp[k]
                        pos = start + <uint64_t>i0
                        for j in range(m):
                            gi = pos + <uint64_t>j
                            if j == 0 or (gi & 3) == 0:
                                z = splitmix64_at(key, gi >> 2)
                            u = (z >> ((gi & 3) << 4)) & 0xFFFF
                            vk[j] = vk[j] * <double>(u >= drop_thr)
                    if consensus == 1:
                        for j in range(m):
                            s[j] = s[j] + wk * vk[j]
                    elif consensus == 2:
                        for j in range(m):
                            s[j] = s[j] + <double>((vk[j] > 0.0) - (vk[j] < 0.0))
                # Phase 2: sums over the entries that agree with the elected sign.
                for k in range(nk):
                    vk = vals + k * BLOCK
                    wk = w[k]
                    if consensus == 0:
                        for j in range(m):
                            num[j] = num[j] + wk * vk[j]
                            den[j] = den[j] + wk * <double>(vk[j] != 0.0)
                    else:
                        for j in range(m):
                            v = vk[j]
                            g = <double>(((v > 0.0) & (s[j] > 0.0)) | ((v < 0.0) & (s[j] < 0.0)))
                            num[j] = num[j] + (wk * v) * g
                            den[j] = den[j] + wk * g
                if disjoint:
                    for j in range(m):
                        e = num[j] / (den[j] + <double>(den[j] == 0.0))
                        out[i0 + j] = <float>(bb[j] + lam * e)
                else:
                    for j in range(m):
                        out[i0 + j] = <float>(bb[j] + lam * (num[j] * inv_den))
                i0 += m
            for k in range(nk):
                if (flags[k] & NONFINITE) and bad < 0:
                    bad = k
        return bad
    finally:
        free(vals)
        free(flags)
