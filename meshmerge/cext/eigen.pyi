from typing import Any

import numpy as np
import numpy.typing as npt

MAX_SWEEPS: int

def jacobi_eigh(a: npt.NDArray[Any]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
