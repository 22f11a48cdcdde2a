import numpy as np
import numpy.typing as npt

def weighted_sum_f32(
    inputs: list[npt.NDArray[np.float32]], weights: npt.NDArray[np.float64], out: npt.NDArray[np.float32]
) -> None: ...
def weighted_sum_f64(
    inputs: list[npt.NDArray[np.float64]], weights: npt.NDArray[np.float64], out: npt.NDArray[np.float64]
) -> None: ...
