import contextlib

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.crdt.tensorfile import TensorFileError, dumps, loads


def sample() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((3, 2)).astype(np.float32), "b": np.arange(5, dtype=np.float16)}


def test_roundtrip_including_bf16() -> None:
    t = {**sample(), "c": np.array([0x3F80, 0x4000], dtype=np.uint16)}
    arrays, dtypes = loads(dumps(t, {"a": "F32", "b": "F16", "c": "BF16"}))
    assert dtypes == {"a": "F32", "b": "F16", "c": "BF16"}
    for k in t:
        assert np.array_equal(arrays[k], t[k])


def test_interoperates_with_the_safetensors_package() -> None:
    t = sample()
    ours = dumps(t, {"a": "F32", "b": "F16"})
    theirs = safetensors.numpy.load(ours)
    assert all(np.array_equal(theirs[k], t[k]) for k in t)
    arrays, _ = loads(safetensors.numpy.save(t))
    assert all(np.array_equal(arrays[k], t[k]) for k in t)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda b: b[:4], "shorter than"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b + b"\x00", "after the last tensor"),
        (lambda b: b[:-1], "outside"),
        (lambda b: b[:8] + b[8:].replace(b'"F32"', b'"I64"'), "unsupported dtype"),
        (lambda b: b[:8] + b[8:].replace(b"[3,2]", b"[3,3]"), "do not match"),
        (lambda b: b[:8] + b"!" + b[9:], "not JSON"),
    ],
)
def test_malformed_files_give_clear_errors(mutate, fragment: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TensorFileError, match=fragment):
        loads(mutate(dumps(sample(), {"a": "F32", "b": "F16"})))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_tensorfile_error(data: bytes) -> None:
    with contextlib.suppress(TensorFileError):
        loads(data)
