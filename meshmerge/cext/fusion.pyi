import numpy as np
import numpy.typing as npt

FUSION_BLOCK: int

def softmax_kl_rows(
    x: npt.NDArray[np.float32], b: npt.NDArray[np.float32], threads: int = 0
) -> npt.NDArray[np.float64]: ...
def det_exp(x: float) -> float: ...
