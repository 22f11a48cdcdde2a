/* Shared by the kernels: target clones, the split of work over threads and
   streaming stores for large outputs.

   Determinism: a clone only changes vector width (same IEEE operations in the
   same order, -ffp-contract=off), and threads get disjoint element ranges, so
   neither the CPU nor the thread count changes a result byte. */
#ifndef MM_PAR_H
#define MM_PAR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MM_CLONES
#endif

/* Threads to use for n elements: at most `want`, each with >= grain elements. */
static inline int mm_team(int want, Py_ssize_t n, Py_ssize_t grain)
{
#ifdef _OPENMP
    if (grain < 1) grain = 1;
    Py_ssize_t most = n / grain;
    if (most < 1) most = 1;
    return want < 1 ? 1 : (want < most ? want : (int)most);
#else
    (void)want; (void)n; (void)grain;
    return 1;
#endif
}

/* Work is split into blocks of `grain` elements handed out dynamically
   (a descheduled thread on a loaded machine does not hold the others up);
   blocks are disjoint, so the order they run in changes no byte.
   MM_PAR_BLOCKS(n, grain, nt, body) runs body with lo, hi, tid in scope. */
#ifdef _OPENMP
#define MM_TID() omp_get_thread_num()
#else
#define MM_TID() 0
#endif
#define MM_PAR_BLOCKS(n, grain, nt, body)                                          \
    do {                                                                           \
        Py_ssize_t mm_nb_ = ((n) + (grain) - 1) / (grain);                         \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 1) if(nt > 1)") \
        for (Py_ssize_t mm_b_ = 0; mm_b_ < mm_nb_; mm_b_++) {                      \
            Py_ssize_t lo = mm_b_ * (grain);                                       \
            Py_ssize_t hi = lo + (grain) < (n) ? lo + (grain) : (n);               \
            int tid = MM_TID();                                                    \
            body                                                                   \
        }                                                                          \
    } while (0)

/* Start of thread t's range out of nt over n elements, a multiple of `align`
   (the last range ends at n). */
static inline Py_ssize_t mm_cut(Py_ssize_t n, int nt, int t, Py_ssize_t align)
{
    if (t >= nt) return n;
    Py_ssize_t units = (n + align - 1) / align;
    Py_ssize_t c = (units * (Py_ssize_t)t / nt) * align;
    return c < n ? c : n;
}

/* Copy m floats from the L1/L2-resident row to dst; with `stream`, through
   non-temporal 16-byte stores wherever dst is 16-byte aligned (SSE, so every
   x86-64 clone has them; the write-combining buffers merge them into full
   lines). Moves bits only, so the bytes written are the same either way. */
static inline __attribute__((always_inline)) void mm_put_f32(float *dst, const float *row, Py_ssize_t m,
                                                             int stream)
{
#if defined(__x86_64__)
    if (stream) {
        Py_ssize_t j = 0;
        while (j < m && ((uintptr_t)(dst + j) & 15) != 0) { dst[j] = row[j]; j++; }
        for (; j + 4 <= m; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(row + j));
        for (; j < m; j++) dst[j] = row[j];
        return;
    }
#else
    (void)stream;
#endif
    memcpy(dst, row, (size_t)m * sizeof(float));
}

/* flags[k] gets bit 31 if the per-element weights f_k[lo .. lo+m) (Fisher values,
   Gram diagonals) hold a NaN, an Inf or a negative value (-0.0 is fine): the rescan
   of a block whose sums or sign bits said something is wrong. */
static inline void mm_flag_bad_weights(const float *const *fs, Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t m,
                                       uint32_t *flags)
{
    for (Py_ssize_t k = 0; k < nk; k++) {
        const float *f = fs[k] + lo;
        uint32_t bf = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            uint32_t bits;
            memcpy(&bits, &f[j], 4);
            /* bad iff bits > 0x7F7FFFFF (Inf, NaN or negative) and not -0.0 */
            bf |= (uint32_t)(bits > 0x7F7FFFFFu && bits != 0x80000000u) << 31;
        }
        flags[k] |= bf;
    }
}

/* flags[k] gets bit 31 if x_k[lo .. lo+m) holds a NaN or Inf: the rescan of a
   block whose float64 sums came out non-finite, to name the inputs. */
static inline void mm_flag_nonfinite(const float *const *xs, Py_ssize_t nk, Py_ssize_t lo, Py_ssize_t m,
                                     uint32_t *flags)
{
    for (Py_ssize_t k = 0; k < nk; k++) {
        const float *x = xs[k] + lo;
        uint32_t f = 0;
        for (Py_ssize_t j = 0; j < m; j++) {
            uint32_t bits;
            memcpy(&bits, &x[j], 4);
            f |= (bits & 0x7F800000u) + 0x00800000u;
        }
        flags[k] |= f;
    }
}

#endif
