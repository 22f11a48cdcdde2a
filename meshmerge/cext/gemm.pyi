from typing import Any

import numpy as np
import numpy.typing as npt

def matmul(
    a: npt.NDArray[Any], b: npt.NDArray[Any], *, isa: str | None = None, threads: int = 0
) -> npt.NDArray[np.float64]: ...
def gram_rows(b: npt.NDArray[Any], *, isa: str | None = None, threads: int = 0) -> npt.NDArray[np.float64]: ...
