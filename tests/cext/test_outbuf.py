import gc
from collections.abc import Iterator

import numpy as np
import pytest

from meshmerge.cext.outbuf import HUGE_PAGE, MIN_BYTES, empty_f32, output_cache_bytes, set_output_cache


@pytest.fixture
def cache() -> Iterator[None]:
    _, limit = output_cache_bytes()
    set_output_cache(0)  # start empty
    yield
    set_output_cache(limit)


def test_large_output_is_huge_page_aligned_and_usable() -> None:
    n = MIN_BYTES // 4 + 1001
    a = empty_f32(n)
    assert a.dtype == np.float32 and a.shape == (n,)
    assert a.flags.c_contiguous and a.flags.writeable
    assert a.ctypes.data % HUGE_PAGE == 0
    a[:] = np.arange(n, dtype=np.float32)
    assert a[-1] == np.float32(n - 1)


def test_views_keep_the_mapping_alive(cache: None) -> None:
    set_output_cache(64 << 20)
    n = MIN_BYTES // 4
    view = empty_f32(n).reshape(2, -1)[1]
    gc.collect()
    assert output_cache_bytes()[0] == 0  # still in use, not cached
    view[:] = 3.0
    other = empty_f32(n)  # must not get the memory the view still uses
    other[:] = 5.0
    assert float(view.sum()) == 3.0 * view.size
    del view, other
    assert output_cache_bytes()[0] == 2 * MIN_BYTES


def test_released_outputs_are_reused_up_to_the_limit(cache: None) -> None:
    n = MIN_BYTES // 4 + 7  # rounds up to a whole number of huge pages
    size = -(-n * 4 // HUGE_PAGE) * HUGE_PAGE
    set_output_cache(size)
    a = empty_f32(n)
    addr = a.ctypes.data
    b = empty_f32(n)
    del a
    assert output_cache_bytes() == (size, size)
    del b  # no room left: unmapped
    assert output_cache_bytes() == (size, size)
    c = empty_f32(n)
    assert c.ctypes.data == addr and output_cache_bytes()[0] == 0
    assert empty_f32(n + HUGE_PAGE).shape == (n + HUGE_PAGE,)  # other size: a new mapping
    del c
    set_output_cache(0)
    assert output_cache_bytes() == (0, 0)


def test_small_output_is_a_plain_array() -> None:
    a = empty_f32(10)
    assert a.shape == (10,) and a.dtype == np.float32 and a.flags.owndata
    assert empty_f32(0).shape == (0,)
    with pytest.raises(ValueError, match="n must be >= 0"):
        empty_f32(-1)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        set_output_cache(-1)


def test_cache_limit_comes_from_the_environment() -> None:
    import subprocess
    import sys

    code = "from meshmerge.cext.outbuf import output_cache_bytes as c; print(c()[1])"
    for raw, want in (("", str(256 << 20)), ("3", str(3 << 20)), ("0", "0")):
        env = {"MESHMERGE_OUTPUT_CACHE_MB": raw, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
    bad = subprocess.run([sys.executable, "-c", code], env={"MESHMERGE_OUTPUT_CACHE_MB": "lots"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "MESHMERGE_OUTPUT_CACHE_MB must be a non-negative integer" in bad.stderr
