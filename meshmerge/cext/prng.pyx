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
    """Integer threshold T so that ``(draw >> 11) < T`` happens with probability p (exact for 53 bits)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError("p must lie in [0, 1]")
    import math
    return math.ceil(p * 9007199254740992.0)


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
