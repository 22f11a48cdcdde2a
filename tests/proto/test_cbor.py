import contextlib
import math

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshmerge.proto.cbor import CodecError, Limits, decode, encode

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(values)
def test_roundtrip_is_identity_and_canonical(value: object) -> None:
    data = encode(value)
    assert decode(data) == value
    assert encode(decode(data)) == data
    assert data == cbor2.dumps(value, canonical=True)  # cbor2 agrees on the canonical form


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x18\x01", "non-minimal"),
        (bytes.fromhex("a2616201616102"), "not in canonical order"),  # keys out of order
        (bytes.fromhex("a2616101616102"), "or duplicated"),  # duplicate key
        (bytes.fromhex("a2026161016161"), "not in canonical order"),  # integer keys out of order
        (bytes.fromhex("a14161"), "map keys must be text strings or integers"),
        (bytes.fromhex("5bffffffffffffffff"), "exceeds limit"),  # 2**64-byte string, 9 bytes of input
        (b"\x9f\xff", "indefinite"),
        (b"\xc1\x00", "tag 1"),
        (b"\x01\x02", "trailing"),
        (bytes.fromhex("fb3fe0000000000000"), "shortest exact width"),  # 0.5 as a double
        (bytes.fromhex("fa3fc00000"), "shortest exact width"),  # 1.5 as a single
        (b"\xf7", "simple value 23"),
        (b"\x62\xff\xfe", "UTF-8"),
        (bytes.fromhex("f97e00"), "NaN"),
        (b"", "empty"),
        (b"\x9a\xff\xff\xff\xff", "exceeds limit"),
        (b"\x83\x01\x02", "truncated"),
    ],
)
def test_rejections_are_typed_and_say_why(data: bytes, fragment: str) -> None:
    with pytest.raises(CodecError, match=fragment):
        decode(data)


def test_depth_and_item_limits() -> None:
    nested: object = 0
    for _ in range(40):
        nested = [nested]
    with pytest.raises(CodecError, match="nesting deeper"):
        decode(cbor2.dumps(nested))
    with pytest.raises(CodecError, match="more than 10 items"):
        decode(encode(list(range(20))), Limits(max_items=10))
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


def test_encode_refuses_what_it_cannot_represent_canonically() -> None:
    for bad in (math.nan, math.inf, {b"k": 1}, {1.5: 1}, object(), 2**64):
        with pytest.raises(CodecError):
            encode(bad)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_only_raise_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        decode(data)


@settings(max_examples=500, deadline=None)
@given(values, st.data())
def test_mutated_valid_messages_only_raise_codec_error(value: object, data: st.DataObject) -> None:
    raw = bytearray(encode(value))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        elif op == "delete" and raw:
            del raw[i]
        elif op == "truncate":
            del raw[i:]
    try:
        decoded = decode(bytes(raw))
    except CodecError:
        return
    assert encode(decoded) == bytes(raw)


@given(st.text(max_size=30))
def test_text_validation_agrees_with_python_utf8(text: str) -> None:
    raw = text.encode("utf-8", errors="surrogatepass")
    item = (
        encode(b"x")[:0] + bytes([0x78, len(raw)]) + raw if len(raw) >= 24 else bytes([0x60 | len(raw)]) + raw
    )
    try:
        raw.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    if valid:
        assert decode(item) == text
    else:
        with pytest.raises(CodecError, match="UTF-8"):
            decode(item)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc0\x80",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        b"\xe0\x80\x80",
        b"\xf0\x80\x80\x80",
        b"\xc3",
        b"\xff",
    ],
)
def test_overlong_surrogate_and_out_of_range_utf8_rejected(raw: bytes) -> None:
    with pytest.raises(CodecError, match="UTF-8"):
        decode(bytes([0x60 | len(raw)]) + raw)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_use_the_shortest_exact_width(x: float) -> None:
    assert encode(x) == cbor2.dumps(x, canonical=True)
    assert decode(encode(x)) == x
