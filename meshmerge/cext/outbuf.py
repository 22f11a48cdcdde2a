"""Output arrays for large merge results, backed by 2 MiB transparent huge pages.

A merge writes a fresh output the size of one model tensor. Every page of it
is faulted in (and zeroed by the kernel) on first write, so for a 100 MB
tensor 4 KiB pages mean 25,600 faults, a cost of the same order as the merge
itself. numpy already asks for huge pages (``MADV_HUGEPAGE``) on large
allocations, but malloc returns a block that is not 2 MiB-aligned, so its
first and last partial 2 MiB stretches still fault page by page (~900 faults
for 100 MB). Here the array starts on a 2 MiB boundary of a private anonymous
mapping with ``MADV_HUGEPAGE`` (which this machine's THP ``madvise`` mode
honours), so all of it can be mapped with 2 MiB pages. The mapping is
released when the last view of the array goes away.
"""

from __future__ import annotations

import mmap
from contextlib import suppress

import numpy as np
import numpy.typing as npt

#: Huge page size on x86-64 (PMD).
HUGE_PAGE = 2 << 20
#: Below this many bytes a plain ``np.empty`` is as good (few pages to fault).
MIN_BYTES = 4 << 20

_HAVE_THP = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def empty_f32(n: int) -> npt.NDArray[np.float32]:
    """An uninitialised 1-D float32 array of ``n`` elements; huge-page backed when large."""
    nbytes = n * 4
    if nbytes < MIN_BYTES or not _HAVE_THP:
        return np.empty(n, dtype=np.float32)
    # Private, not the default shared mapping: shared anonymous memory is shmem,
    # whose huge pages follow a different THP setting.
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with suppress(OSError):  # THP disabled: still a correct array, with 4 KiB pages
        buf.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(buf, dtype=np.uint8)
    skip = -raw.ctypes.data % HUGE_PAGE
    return raw[skip : skip + nbytes].view(np.float32)
