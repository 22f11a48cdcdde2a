import numpy as np
import numpy.typing as npt

def overlap_counts(
    xs: list[npt.NDArray[np.float32]],
    base: npt.NDArray[np.float32] | None,
    eps: float,
    shared: npt.NDArray[np.int64],
    unique: npt.NDArray[np.int64],
    threads: int = 0,
) -> int: ...
def overlap_merge(
    xs: list[npt.NDArray[np.float32]],
    base: npt.NDArray[np.float32] | None,
    weights: npt.NDArray[np.float64],
    lam: npt.NDArray[np.float64],
    eps: float,
    out: npt.NDArray[np.float32],
    threads: int = 0,
) -> int: ...
