# cython: language_level=3
"""Deterministic float64 matrix products for the spectral merges.

``matmul(a, b)`` is ``a @ b`` with every output defined as
``out[i, j] = (...((0.0 + a[i,0]*b[0,j]) + a[i,1]*b[1,j]) + ...)``: ``t``
ascending, one rounding per multiply and per add (``-ffp-contract=off``, no
FMA), the same bits as the plain loop ``out = out + a[:, t, None] * b[t]``.
BLAS reorders and fuses these operations (and differs between builds, CPUs and
thread counts), so it cannot be used where replicas must agree byte for byte.

Speed comes from the schedule, not from changing the arithmetic: a micro-kernel
(``mm_gemm_kernel.h``) keeps a tile of 6 x 32 outputs (AVX-512; 4 x 8 with
AVX2, 4 x 4 otherwise) in registers while it walks ``t``, reading a packed,
cache-resident panel of ``b``; the accumulators are stored and reloaded
between blocks of 512 steps, which keeps the order. Threads take disjoint
output tiles, so the thread count changes no byte, and neither does the
instruction set (each output sees the same operations in every variant).

``gram_rows(b)`` is ``b @ b.T`` (the Gram matrix of the rows), computing only
the tiles that reach the diagonal or above and mirroring the rest:
``b[i,t]*b[j,t]`` and ``b[j,t]*b[i,t]`` are the same product, so the bytes
equal ``matmul(b, b.T)``, at about half the work. Both accept strided views (a
transpose costs no copy).
"""

import numpy as np
cimport numpy as cnp

from meshmerge.cext.threads import get_grain, get_threads

cnp.import_array()

cdef extern from *:
    """
    #include <stdlib.h>
    #include <string.h>
    #include "mm_par.h"

    #define MMG_KC 512        /* t-steps per packed panel */
    #define MMG_ROW_TILES 16  /* row tiles per block of work handed to a thread */

    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    #define MMG_X86 1
    #define MMG_SUFFIX avx512
    #define MMG_TARGET __attribute__((target("avx512f")))
    #define MMG_W 8
    #define MMG_NV 4
    #define MMG_MR 6
    #include "mm_gemm_kernel.h"
    #undef MMG_SUFFIX
    #undef MMG_TARGET
    #undef MMG_W
    #undef MMG_NV
    #undef MMG_MR

    #define MMG_SUFFIX avx2
    #define MMG_TARGET __attribute__((target("avx2")))
    #define MMG_W 4
    #define MMG_NV 2
    #define MMG_MR 4
    #include "mm_gemm_kernel.h"
    #undef MMG_SUFFIX
    #undef MMG_TARGET
    #undef MMG_W
    #undef MMG_NV
    #undef MMG_MR
    #endif

    #define MMG_SUFFIX generic
    #define MMG_TARGET
    #define MMG_W 2
    #define MMG_NV 2
    #define MMG_MR 4
    #include "mm_gemm_kernel.h"
    #undef MMG_SUFFIX
    #undef MMG_TARGET
    #undef MMG_W
    #undef MMG_NV
    #undef MMG_MR

    typedef void (*mmg_block_fn)(const double *, Py_ssize_t, Py_ssize_t, const double *, Py_ssize_t,
                                 Py_ssize_t, double *, Py_ssize_t, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                 Py_ssize_t, Py_ssize_t, double *);

    typedef struct { mmg_block_fn block; int nr, mr; } mmg_isa;

    /* The widest variant this CPU runs (they all give the same bits). force: 0 = best,
       1 = generic, 2 = avx2 (if supported), for the tests. */
    static mmg_isa mmg_pick(int force)
    {
        mmg_isa g = {mmg_block_generic, 4, 4};
    #ifdef MMG_X86
        if (force != 1 && force != 2 && __builtin_cpu_supports("avx512f")) {
            mmg_isa v = {mmg_block_avx512, 32, 6};
            return v;
        }
        if (force != 1 && __builtin_cpu_supports("avx2")) {
            mmg_isa v = {mmg_block_avx2, 8, 4};
            return v;
        }
    #endif
        (void)force;
        return g;
    }

    /* out (p x s, rows ldo apart) = A (p x q) @ B (q x s), A(i, t) = a[i*sai + t*sat],
       B(t, j) = b[t*sbt + j*sbj]. upper: only tiles reaching the diagonal or above are
       computed and the rest mirrored (for B = A^T, p = s). Returns -1 if out of memory. */
    static int mm_gemm(const double *a, Py_ssize_t sai, Py_ssize_t sat, const double *b, Py_ssize_t sbt,
                       Py_ssize_t sbj, double *out, Py_ssize_t ldo, Py_ssize_t p, Py_ssize_t q, Py_ssize_t s,
                       int upper, int want, Py_ssize_t grain, int force)
    {
        mmg_isa isa = mmg_pick(force);
        Py_ssize_t rows = (Py_ssize_t)isa.mr * MMG_ROW_TILES;
        Py_ssize_t chunks = (p + rows - 1) / rows, panels = (s + isa.nr - 1) / isa.nr;
        Py_ssize_t blocks = chunks * panels;
        int nt = mm_team(want, p * q * s, grain);
        if (nt > blocks) nt = (int)blocks;
        Py_ssize_t kc = q < MMG_KC ? q : MMG_KC;
        size_t per = ((size_t)kc * (size_t)isa.nr * sizeof(double) + 63) / 64 * 64;
        double *bufs = aligned_alloc(64, per * (size_t)nt);
        if (bufs == NULL) return -1;
        MM_PAR_BLOCKS(blocks, 1, nt, {
            (void)hi;
            Py_ssize_t j0 = lo / chunks * isa.nr;
            Py_ssize_t r0 = lo % chunks * rows;
            Py_ssize_t nc = s - j0 < isa.nr ? s - j0 : isa.nr;
            Py_ssize_t r1 = p - r0 < rows ? p : r0 + rows;
            if (upper && r1 > j0 + nc) r1 = j0 + nc;
            if (r0 < r1)
                isa.block(a, sai, sat, b, sbt, sbj, out, ldo, q, r0, r1, j0, nc,
                          bufs + (size_t)tid * (per / sizeof(double)));
        });
        free(bufs);
        if (upper) {
            for (Py_ssize_t i = 1; i < p; i++)
                for (Py_ssize_t j = 0; j < i; j++) out[i * ldo + j] = out[j * ldo + i];
        }
        return 0;
    }
    """
    int mm_gemm(const double *a, Py_ssize_t sai, Py_ssize_t sat, const double *b, Py_ssize_t sbt,
                Py_ssize_t sbj, double *out, Py_ssize_t ldo, Py_ssize_t p, Py_ssize_t q, Py_ssize_t s,
                int upper, int want, Py_ssize_t grain, int force) nogil


cdef object _f64_view(x):
    """x as a float64 2-D array whose strides are whole elements (a view when possible)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {arr.shape}")
    if arr.strides[0] % 8 or arr.strides[1] % 8:
        arr = np.ascontiguousarray(arr)
    return arr


cdef object _product(a, b, bint upper, int force, int threads):
    cdef const double[:, :] av = a
    cdef const double[:, :] bv = b
    cdef Py_ssize_t p = av.shape[0], q = av.shape[1], s = bv.shape[1]
    if q == 0 or p == 0 or s == 0:
        return np.zeros((p, s), dtype=np.float64)
    out = np.empty((p, s), dtype=np.float64)
    cdef double[:, ::1] ov = out
    cdef Py_ssize_t sai = av.strides[0] // 8, sat = av.strides[1] // 8
    cdef Py_ssize_t sbt = bv.strides[0] // 8, sbj = bv.strides[1] // 8
    cdef int want = threads if threads > 0 else get_threads()
    cdef Py_ssize_t grain = get_grain()
    cdef int rc
    with nogil:
        rc = mm_gemm(&av[0, 0], sai, sat, &bv[0, 0], sbt, sbj, &ov[0, 0], s, p, q, s, upper, want, grain, force)
    if rc != 0:
        raise MemoryError("matmul: no memory for the packed panels")
    return out


def matmul(a, b, *, isa=None, int threads=0):
    """``a @ b`` in float64 in the fixed order above (any strides; other dtypes are converted).

    ``isa`` ("generic" or "avx2") forces a narrower kernel, for tests; ``threads`` > 0
    caps the threads of this call (0: :func:`meshmerge.cext.threads.get_threads`), for
    callers that already run products in parallel. Neither changes a byte.
    """
    av, bv = _f64_view(a), _f64_view(b)
    if av.shape[1] != bv.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(np.shape(a))} and {tuple(np.shape(b))} do not chain")
    return _product(av, bv, False, _force(isa), threads)


def gram_rows(b, *, isa=None, int threads=0):
    """``b @ b.T`` with the bytes of ``matmul(b, b.T)``, computing only the upper triangle
    (``isa`` and ``threads`` as for :func:`matmul`)."""
    bv = _f64_view(b)
    return _product(bv, bv.T, True, _force(isa), threads)


cdef int _force(isa) except -1:
    if isa is None:
        return 0
    if isa == "generic":
        return 1
    if isa == "avx2":
        return 2
    raise ValueError(f"isa must be None, 'generic' or 'avx2', got {isa!r}")
