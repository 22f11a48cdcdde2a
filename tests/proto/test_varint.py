"""The shared varint codec: round trips, the 64-bit bound, and typed errors on bad input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmerge.proto.varint import VarintError, encode_uvarint, read_uvarint


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.binary(max_size=8))
def test_round_trip_leaves_the_rest(value: int, rest: bytes) -> None:
    data = encode_uvarint(value) + rest
    decoded, pos = read_uvarint(data)
    assert decoded == value
    assert data[pos:] == rest


@pytest.mark.parametrize(
    ("value", "wire"),
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02")],
)
def test_known_encodings(value: int, wire: bytes) -> None:
    assert encode_uvarint(value) == wire


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_encoder_refuses_values_outside_64_bits(value: int) -> None:
    with pytest.raises(ValueError, match="uvarint"):
        encode_uvarint(value)


def test_truncated_input_says_so() -> None:
    with pytest.raises(VarintError) as info:
        read_uvarint(b"\x80\x80")
    assert info.value.truncated


def test_end_bound_is_respected() -> None:
    with pytest.raises(VarintError):
        read_uvarint(b"\x80\x01", 0, 1)


@pytest.mark.parametrize(
    "wire", [b"\xff" * 10 + b"\x01", b"\xff" * 9 + b"\x02"], ids=["eleven bytes", "over 64 bits"]
)
def test_malformed_input_is_not_reported_as_truncated(wire: bytes) -> None:
    with pytest.raises(VarintError) as info:
        read_uvarint(wire)
    assert not info.value.truncated


@given(st.binary(max_size=12), st.integers(min_value=0, max_value=12))
def test_arbitrary_bytes_decode_or_raise_varint_error(data: bytes, pos: int) -> None:
    try:
        value, end = read_uvarint(data, pos)
    except VarintError:
        return
    assert 0 <= value < 1 << 64
    assert pos < end <= len(data)
