# cython: language_level=3
"""Counter-based PRNG keyed by (seed, tensor name, stream).

``stream_key`` hashes the merge seed (Merkle root), a stream number (the
contributor's canonical position) and the tensor name with SHA-256 into a
64-bit SplitMix64 key; the draw for element ``i`` is ``splitmix64_at(key, i)``.
Nothing depends on chunk boundaries or thread scheduling.
"""

import hashlib

import numpy as np
cimport numpy as cnp
from libc.stdint cimport uint64_t

from meshmerge.cext._common cimport splitmix64_at

cnp.import_array()

_DOMAIN = b"meshmerge/prng/splitmix64/v1\x00"


def stream_key(bytes seed, str name, unsigned int stream):
    """64-bit key for one (seed, tensor, stream) triple."""
    h = hashlib.sha256(_DOMAIN + seed + stream.to_bytes(4, "big") + name.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little")


def drop_threshold(double p):
    """16-bit threshold T: a uniform 16-bit value is ``< T`` with probability T/65536.

    ``p`` is rounded to the nearest multiple of 2^-16 (ties to even), which is
    the resolution of DARE/DELLA drop rates here.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must lie in [0, 1]")
    return round(p * 65536.0)


def drop_lanes(uint64_t key, uint64_t start, cnp.uint16_t[::1] out):
    """The 16-bit values the drop masks compare: lane ``i mod 4`` of draw ``i div 4``."""
    cdef Py_ssize_t j, n = out.shape[0]
    cdef uint64_t gi
    with nogil:
        for j in range(n):
            gi = start + <uint64_t>j
            out[j] = <cnp.uint16_t>((splitmix64_at(key, gi >> 2) >> ((gi & 3) << 4)) & 0xFFFF)


def random_u64(uint64_t key, uint64_t start, uint64_t[::1] out):
    """Draws ``start .. start+len(out)-1`` of the stream ``key``."""
    cdef Py_ssize_t i, n = out.shape[0]
    with nogil:
        for i in range(n):
            out[i] = splitmix64_at(key, start + <uint64_t>i)


def uniform_f64(uint64_t key, uint64_t start, double[::1] out):
    """Uniform doubles in [0, 1) with 53 random bits each."""
    cdef Py_ssize_t i, n = out.shape[0]
    with nogil:
        for i in range(n):
            out[i] = <double>(splitmix64_at(key, start + <uint64_t>i) >> 11) * (1.0 / 9007199254740992.0)
