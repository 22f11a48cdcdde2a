import numpy as np
import numpy.typing as npt

LOG_SPAN: int

def regmean_average(
    xs: list[npt.NDArray[np.float32]],
    fs: list[npt.NDArray[np.float32]] | None,
    weights: npt.NDArray[np.float64],
    lam: float,
    out: npt.NDArray[np.float32],
    fout: npt.NDArray[np.float32] | None,
    threads: int = 0,
) -> tuple[int, int]: ...
def abs_log_spans(
    xs: list[npt.NDArray[np.float32]],
    base: npt.NDArray[np.float32] | None,
    spans: npt.NDArray[np.float64],
    threads: int = 0,
) -> int: ...
def det_log(a: float) -> float: ...
def mean_abs(
    xs: list[npt.NDArray[np.float32]],
    base: npt.NDArray[np.float32] | None,
    weights: npt.NDArray[np.float64],
    mag: npt.NDArray[np.float64],
    threads: int = 0,
) -> int: ...
def keep_base_at_most(
    values: npt.NDArray[np.float64],
    threshold: float,
    base: npt.NDArray[np.float32] | None,
    out: npt.NDArray[np.float32],
) -> None: ...
