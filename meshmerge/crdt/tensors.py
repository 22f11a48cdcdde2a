"""Tensor dtypes and specs shared by contributions, schemas and strategies.

Tensors travel and rest as safetensors. Inside the merge layer they are numpy
arrays; bfloat16 has no numpy dtype, so it is carried as its uint16 bit
pattern and widened to float32 exactly (bf16 is the top half of an f32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

#: safetensors dtype name -> numpy storage dtype. BF16 is stored as uint16 bits.
STORAGE_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
}
FLOAT_DTYPES: Final = frozenset(STORAGE_DTYPES)


class TensorError(ValueError):
    """A tensor does not match what the merge set or strategy requires."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, safetensors dtype and shape of one tensor of a model."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 1024:
            raise TensorError(f"tensor name must be 1..1024 characters, got {len(self.name)}")
        if self.dtype not in FLOAT_DTYPES:
            raise TensorError(
                f"tensor {self.name!r}: dtype {self.dtype!r} not supported; use one of {sorted(FLOAT_DTYPES)}"
            )
        if any(d < 0 for d in self.shape):
            raise TensorError(f"tensor {self.name!r}: negative dimension in {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE_DTYPES[self.dtype].itemsize


def little_endian(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The array as contiguous little-endian storage: the byte order manifests hash and files hold."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False)


def dtype_name(array: npt.NDArray[np.generic], *, bf16: bool = False) -> str:
    """The safetensors dtype name of a numpy array (uint16 means BF16 only if asked)."""
    if bf16 and array.dtype == np.uint16:
        return "BF16"
    for name, dt in STORAGE_DTYPES.items():
        if name != "BF16" and array.dtype == dt:
            return name
    raise TensorError(f"numpy dtype {array.dtype} has no supported safetensors dtype")


def to_f32(array: npt.NDArray[np.generic], dtype: str) -> npt.NDArray[np.float32]:
    """Widen a stored tensor to float32 exactly (F64 is narrowed with RNE)."""
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(array, dtype=np.float32)


def from_f32(array: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[np.generic]:
    """Round float32 to the storage dtype, round-to-nearest-even (NaN stays NaN)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        out = ((bits + rounding) >> 16).astype(np.uint16)
        nan = np.isnan(array)
        if nan.any():
            out[nan] = np.uint16(0x7FC0)
        return out
    return array.astype(STORAGE_DTYPES[dtype])
