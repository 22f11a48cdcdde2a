from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

def ties_coordinates(
    vs: list[npt.NDArray[Any]], weights: Sequence[float], density: float
) -> npt.NDArray[np.float64]: ...
