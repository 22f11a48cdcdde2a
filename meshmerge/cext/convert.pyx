# cython: language_level=3
"""Dtype conversions and finiteness checks used while streaming chunks.

bfloat16 is carried as uint16 bits; widening to float32 is exact (the bits
become the top half of the float32). Narrowing rounds to nearest, ties to
even, and keeps NaN a (quiet) NaN.
"""

cimport numpy as cnp
from libc.stdint cimport uint16_t, uint32_t

from meshmerge.cext._common cimport NONFINITE, f32_bits, nonfinite_bits

cnp.import_array()


def bf16_to_f32(const uint16_t[::1] src, uint32_t[::1] dst):
    """Widen bf16 bits into float32 bits (pass ``f32_array.view(np.uint32)``)."""
    cdef Py_ssize_t i, n = src.shape[0]
    if dst.shape[0] != n:
        raise ValueError("length mismatch")
    with nogil:
        for i in range(n):
            dst[i] = (<uint32_t>src[i]) << 16


def f32_to_bf16(const float[::1] src, uint16_t[::1] dst):
    cdef Py_ssize_t i, n = src.shape[0]
    cdef uint32_t b
    if dst.shape[0] != n:
        raise ValueError("length mismatch")
    with nogil:
        for i in range(n):
            b = f32_bits(src[i])
            if (b & 0x7FFFFFFFu) > 0x7F800000u:
                dst[i] = <uint16_t>((b >> 16) | 0x0040u)
            else:
                dst[i] = <uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16)


def has_nonfinite(const float[::1] x):
    """True if any element is NaN or Inf."""
    cdef Py_ssize_t i, n = x.shape[0]
    cdef uint32_t f = 0
    with nogil:
        for i in range(n):
            f = f | nonfinite_bits(x[i])
    return (f & NONFINITE) != 0
