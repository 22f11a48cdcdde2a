from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_ITERATIONS: int

def eigh_top(
    a: npt.NDArray[Any],
    choose: Callable[[npt.NDArray[np.float64]], int],
    complement: bool = ...,
    *,
    threads: int = ...,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def eigh(a: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
