"""The safetensors format, read strictly from untrusted bytes.

The file is: 8-byte little-endian header length, a JSON header mapping tensor
names to ``{dtype, shape, data_offsets}`` (plus optional ``__metadata__``),
then the tensor bytes. We parse it ourselves rather than through the
``safetensors`` package because numpy has no bfloat16 (that package refuses
BF16 in its numpy API) and because we want every malformed header to be a
clear :class:`TensorFileError` with bounded work: header size capped, offsets
must tile the data exactly, no overlaps, no gaps, nothing after the last
tensor. Arrays are zero-copy views into the buffer, so a memory-mapped file
is never read in full. Files we write are readable by the ``safetensors``
package (tests check both directions).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from meshmerge.crdt.tensors import STORAGE_DTYPES, little_endian

MAX_HEADER_BYTES: Final = 16 * 1024 * 1024
MAX_TENSORS: Final = 65_536


class TensorFileError(ValueError):
    pass


def dumps(
    tensors: Mapping[str, npt.NDArray[Any]],
    dtypes: Mapping[str, str],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize tensors (sorted by name) with their safetensors dtype names."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        dtype = dtypes[name]
        if array.dtype != STORAGE_DTYPES[dtype]:
            raise TensorFileError(f"tensor {name!r}: array dtype {array.dtype} is not storage for {dtype}")
        raw = little_endian(array).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


def loads(buffer: bytes | memoryview | Any) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
    """Parse a safetensors buffer; returns ({name: array view}, {name: dtype})."""
    view = memoryview(buffer).cast("B")
    if len(view) < 8:
        raise TensorFileError("file shorter than its 8-byte header length")
    head_len = int.from_bytes(view[:8], "little")
    if head_len > MAX_HEADER_BYTES or head_len > len(view) - 8:
        raise TensorFileError(
            f"header length {head_len} exceeds the file or the {MAX_HEADER_BYTES}-byte limit"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + head_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError("header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSORS:
        raise TensorFileError(f"{len(header)} tensors exceed the limit of {MAX_TENSORS}")
    data = view[8 + head_len :]
    spans = []
    for name, info in header.items():
        spans.append((_span(name, info, len(data)), name, info))
    spans.sort()
    cursor = 0
    arrays: dict[str, npt.NDArray[Any]] = {}
    dtypes: dict[str, str] = {}
    for (start, end), name, info in spans:
        if start != cursor:
            raise TensorFileError(f"tensor {name!r}: data does not start where the previous one ends")
        cursor = end
        storage = STORAGE_DTYPES[info["dtype"]].newbyteorder("<")
        array = np.frombuffer(data[start:end], dtype=storage).reshape(info["shape"])
        arrays[name] = array
        dtypes[name] = info["dtype"]
    if cursor != len(data):
        raise TensorFileError(f"{len(data) - cursor} bytes after the last tensor")
    return arrays, dtypes


def _span(name: str, info: Any, data_len: int) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise TensorFileError(f"tensor {name!r}: entry needs exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in STORAGE_DTYPES:
        raise TensorFileError(
            f"tensor {name!r}: unsupported dtype {dtype!r}; use one of {sorted(STORAGE_DTYPES)}"
        )
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorFileError(f"tensor {name!r}: shape must be a list of at most 8 non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise TensorFileError(f"tensor {name!r}: data_offsets must be [begin, end]")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise TensorFileError(f"tensor {name!r}: data_offsets {offsets} outside the {data_len}-byte data")
    if end - start != math.prod(shape) * STORAGE_DTYPES[dtype].itemsize:
        raise TensorFileError(f"tensor {name!r}: {end - start} bytes do not match {dtype} shape {shape}")
    return start, end
