"""Varint framing used by the go driver: round trips and clear errors on bad input (no peers needed)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from meshmerge.testing.interop import run_trio
from meshmerge.testing.interop.framing import BufferedStream, FramingError, encode_uvarint, frame


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1])
def test_uvarint_round_trip(value: int) -> None:
    async def body() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(encode_uvarint(value) + b"rest")
        reader = BufferedStream(b)
        assert await reader.read_uvarint() == value
        assert await reader.read_exactly(4) == b"rest"

    run_trio(body, timeout=5)


def test_uvarint_rejects_negative() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        encode_uvarint(-1)


def test_frames_then_raw_bytes_are_not_lost() -> None:
    async def body() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(frame(b"one") + frame(b"") + b"raw tail")
        await a.send_eof()
        reader = BufferedStream(b)
        assert await reader.read_frame() == b"one"
        assert await reader.read_frame() == b""
        assert await reader.receive_some() == b"raw tail"
        assert await reader.receive_some() == b""

    run_trio(body, timeout=5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (encode_uvarint(10) + b"short", "closed after 5 of 10"),
        (b"\x80", "inside a varint"),
        (b"\xff" * 11, "longer than 10 bytes"),
        (encode_uvarint(1 << 30), "exceeds"),
    ],
)
def test_bad_frames_raise_framing_error(data: bytes, message: str) -> None:
    async def body() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_all(data)
        await a.send_eof()
        with pytest.raises(FramingError, match=message):
            await BufferedStream(b).read_frame(max_size=1 << 20)

    run_trio(body, timeout=5)


def test_clean_eof_between_frames_is_none() -> None:
    async def body() -> None:
        a, b = trio.testing.memory_stream_pair()
        await a.send_eof()
        assert await BufferedStream(b).read_frame() is None

    run_trio(body, timeout=5)
