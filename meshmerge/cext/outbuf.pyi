import numpy as np
import numpy.typing as npt

HUGE_PAGE: int
MIN_BYTES: int
CACHE_ENV: str
DEFAULT_CACHE_MB: int

def empty_f32(n: int) -> npt.NDArray[np.float32]: ...
def set_output_cache(max_bytes: int) -> None: ...
def output_cache_bytes() -> tuple[int, int]: ...
