# cython: language_level=3
"""Inline helpers shared by the kernels (cimported, never imported).

The counter-based PRNG lives here so that every kernel that draws random bits
uses the same definition: the value for element ``i`` of a stream is a pure
function of ``(key, i)``, so masks do not depend on chunking or threads.
"""

from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
cimport numpy as cnp


cdef inline uint64_t splitmix64_at(uint64_t key, uint64_t index) noexcept nogil:
    """The (index+1)-th output of SplitMix64 started at state ``key``.

    SplitMix64 (Steele, Lea, Flood 2014) advances its state by a fixed odd
    constant and hashes it with a bijective mixer; the n-th output therefore
    only needs ``key + (n+1) * gamma`` and is a counter-based generator.
    """
    cdef uint64_t z = key + (index + 1) * <uint64_t>0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint32_t f32_bits(float x) noexcept nogil:
    cdef uint32_t b
    memcpy(&b, &x, 4)
    return b


cdef inline int gather_f32(list xs, Py_ssize_t n, const float** out) except -1:
    """Fill ``out`` with the data pointers of 1-D contiguous float32 arrays of length ``n``.

    The caller keeps ``xs`` alive while the pointers are in use.
    """
    cdef Py_ssize_t k
    cdef cnp.ndarray a
    for k in range(len(xs)):
        a = xs[k]
        if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise ValueError(f"input {k} must be a C-contiguous float32 array")
        if cnp.PyArray_SIZE(a) != n:
            raise ValueError(f"input {k} has {cnp.PyArray_SIZE(a)} elements, expected {n}")
        out[k] = <const float*>cnp.PyArray_DATA(a)
    return 0


cdef inline const float** gather_new_f32(list xs, Py_ssize_t n) except NULL:
    """:func:`gather_f32` into a new malloc'd pointer array (the caller frees it)."""
    cdef const float** p = <const float**>malloc(max(len(xs), 1) * sizeof(float*))
    if p == NULL:
        raise MemoryError()
    try:
        gather_f32(xs, n, p)
    except BaseException:
        free(p)
        raise
    return p


cdef inline const float* optional_f32(object a, Py_ssize_t n) except? NULL:
    """Data pointer of an optional float32 array (``None`` gives NULL)."""
    cdef cnp.ndarray arr
    if a is None:
        return NULL
    arr = a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError("base must be a C-contiguous float32 array")
    if cnp.PyArray_SIZE(arr) != n:
        raise ValueError(f"base has {cnp.PyArray_SIZE(arr)} elements, expected {n}")
    return <const float*>cnp.PyArray_DATA(arr)


cdef enum:
    NONFINITE = 0x80000000


cdef inline uint32_t nonfinite_bits(float x) noexcept nogil:
    """Has bit 31 set iff ``x`` is NaN or Inf (exponent all ones).

    Integer-only so an OR-reduction over it vectorises without fast-math.
    """
    return (f32_bits(x) & 0x7F800000u) + 0x00800000u


cdef inline int first_nonfinite(uint32_t* tflags, Py_ssize_t nk, int nt) noexcept nogil:
    """OR each input's per-thread NaN/Inf flags (thread t's flag for input k at
    ``tflags[t * nk + k]``) into ``tflags[k]``; return the first flagged k, or -1."""
    cdef Py_ssize_t k, t
    cdef int bad = -1
    for k in range(nk):
        for t in range(1, nt):
            tflags[k] |= tflags[t * nk + k]
        if (tflags[k] & NONFINITE) and bad < 0:
            bad = <int>k
    return bad
