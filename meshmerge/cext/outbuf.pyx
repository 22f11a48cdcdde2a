# cython: language_level=3
"""Output arrays for large merge results: 2 MiB huge pages, recycled between merges.

A merge writes a fresh output the size of one model tensor, and every page of
a fresh mapping is faulted in and zeroed by the kernel on first write: for a
100 MB tensor that costs about as much as reading 2-4 contributions. Two
measures, both for outputs of at least ``MIN_BYTES``:

* The array starts on a 2 MiB boundary of a private anonymous mapping with
  ``MADV_HUGEPAGE`` (honoured in THP ``madvise`` mode), so all of it is mapped
  with 2 MiB pages: ~50 faults per 100 MB. ``np.empty`` also asks for huge
  pages, but malloc's block is not aligned and its partial first and last
  2 MiB stretches fault page by page (~400 faults per 100 MB).
* When the last view of such an array goes away its mapping is kept, up to
  ``MESHMERGE_OUTPUT_CACHE_MB`` (default 256) MiB in all, and handed to the
  next output of the same size, already faulted in: a node that merges the
  same model again and again stops paying the page zeroing. Like
  ``np.empty``, the contents are undefined (the previous output's bytes);
  kernels overwrite every element. Set the variable to 0 to unmap at once.
"""

import os

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/mman.h>
    #define MM_HUGE ((size_t)2 << 20)
    /* A mapping of exactly `bytes` (a multiple of MM_HUGE) starting on a
       MM_HUGE boundary, or NULL: over-map by one huge page, unmap the ends. */
    static void *mm_map_huge(size_t bytes)
    {
        size_t span = bytes + MM_HUGE;
        char *p = (char *)mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == (char *)MAP_FAILED) return NULL;
        char *a = (char *)(((uintptr_t)p + MM_HUGE - 1) & ~(uintptr_t)(MM_HUGE - 1));
        if (a > p) munmap(p, (size_t)(a - p));
        if (p + span > a + bytes) munmap(a + bytes, (size_t)(p + span - (a + bytes)));
    #ifdef MADV_HUGEPAGE
        madvise(a, bytes, MADV_HUGEPAGE);  /* THP disabled: still correct, 4 KiB pages */
    #endif
        return a;
    }
    static void mm_unmap(void *p, size_t bytes) { munmap(p, bytes); }
    """
    size_t MM_HUGE
    void* mm_map_huge(size_t nbytes) nogil
    void mm_unmap(void* p, size_t nbytes) nogil

#: Huge page size on x86-64 (PMD).
HUGE_PAGE = MM_HUGE
#: Below this many bytes a plain ``np.empty`` is as good (few pages to fault).
MIN_BYTES = 4 << 20
#: Environment variable: MiB of released output mappings kept for reuse.
CACHE_ENV = "MESHMERGE_OUTPUT_CACHE_MB"
DEFAULT_CACHE_MB = 256

cdef enum:
    SLOTS = 64

cdef void* _slot_ptr[SLOTS]
cdef size_t _slot_size[SLOTS]
cdef int _nslots = 0
cdef size_t _cached = 0
cdef size_t _cache_max = 0
cdef bint _configured = False


cdef void _configure() except *:
    global _cache_max, _configured
    raw = os.environ.get(CACHE_ENV, "").strip()
    mb = DEFAULT_CACHE_MB
    if raw:
        try:
            mb = int(raw)
        except ValueError:
            raise ValueError(f"{CACHE_ENV} must be a non-negative integer (MiB), got {raw!r}") from None
        if mb < 0:
            raise ValueError(f"{CACHE_ENV} must be a non-negative integer (MiB), got {raw!r}")
    _cache_max = <size_t>mb << 20
    _configured = True


cdef void _release(void* ptr, size_t size) noexcept:
    """Keep a mapping for reuse if the cache has room, else unmap it (runs with the GIL)."""
    global _nslots, _cached
    if _nslots < SLOTS and _cached + size <= _cache_max:
        _slot_ptr[_nslots] = ptr
        _slot_size[_nslots] = size
        _nslots += 1
        _cached += size
    else:
        mm_unmap(ptr, size)


cdef void* _take(size_t size) noexcept:
    """A cached mapping of exactly ``size`` bytes (most recently released first), or NULL."""
    global _nslots, _cached
    cdef int i
    cdef void* p
    for i in range(_nslots - 1, -1, -1):
        if _slot_size[i] == size:
            p = _slot_ptr[i]
            _nslots -= 1
            _slot_ptr[i] = _slot_ptr[_nslots]
            _slot_size[i] = _slot_size[_nslots]
            _cached -= size
            return p
    return NULL


cdef void _trim() noexcept:
    """Unmap cached mappings until the cache fits its limit."""
    global _nslots, _cached
    while _nslots and _cached > _cache_max:
        _nslots -= 1
        _cached -= _slot_size[_nslots]
        mm_unmap(_slot_ptr[_nslots], _slot_size[_nslots])


cdef class _Mapping:
    """Owner of one output mapping (the numpy array's base); releases it when freed."""

    cdef void* ptr
    cdef size_t size

    def __dealloc__(self):
        if self.ptr != NULL:
            _release(self.ptr, self.size)
            self.ptr = NULL


def empty_f32(Py_ssize_t n):
    """An uninitialised 1-D float32 array of ``n`` elements; huge-page backed (and recycled) when large."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not _configured:
        _configure()
    cdef size_t nbytes = <size_t>n * 4
    if nbytes < <size_t>MIN_BYTES:
        return np.empty(n, dtype=np.float32)
    cdef size_t size = (nbytes + MM_HUGE - 1) // MM_HUGE * MM_HUGE
    cdef void* ptr = _take(size)
    if ptr == NULL:
        ptr = mm_map_huge(size)
        if ptr == NULL:
            return np.empty(n, dtype=np.float32)
    cdef _Mapping owner = _Mapping.__new__(_Mapping)
    owner.ptr = ptr
    owner.size = size
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_FLOAT32, ptr)
    cnp.set_array_base(arr, owner)
    return arr


def set_output_cache(Py_ssize_t max_bytes):
    """Set how many bytes of released output mappings are kept (0: none); trims the cache now."""
    global _cache_max, _configured
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    _cache_max = <size_t>max_bytes
    _configured = True
    _trim()


def output_cache_bytes():
    """``(bytes cached now, limit)``."""
    if not _configured:
        _configure()
    return int(_cached), int(_cache_max)
