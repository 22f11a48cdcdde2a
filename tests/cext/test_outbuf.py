import gc

import numpy as np

from meshmerge.cext.outbuf import HUGE_PAGE, MIN_BYTES, empty_f32


def test_large_output_is_huge_page_aligned_and_usable() -> None:
    n = MIN_BYTES // 4 + 1001
    a = empty_f32(n)
    assert a.dtype == np.float32 and a.shape == (n,)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % HUGE_PAGE == 0
    a[:] = np.arange(n, dtype=np.float32)
    assert a[-1] == np.float32(n - 1)


def test_views_keep_the_mapping_alive() -> None:
    n = MIN_BYTES // 4
    view = empty_f32(n).reshape(2, -1)[1]
    gc.collect()
    view[:] = 3.0
    assert float(view.sum()) == 3.0 * view.size


def test_small_output_is_a_plain_array() -> None:
    a = empty_f32(10)
    assert a.shape == (10,) and a.dtype == np.float32 and a.flags.owndata
    assert empty_f32(0).shape == (0,)
