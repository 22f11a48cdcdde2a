"""Unsigned-varint length framing over a trio stream, with a read buffer.

The libp2p daemon control protocol, identify and most libp2p protobuf
protocols prefix each message with its length as an unsigned LEB128 varint.
A control connection also turns into a raw libp2p stream after some replies,
so the reader keeps any bytes it buffered past a frame and hands them out
first: nothing the remote sent is lost at the switch.
"""

from __future__ import annotations

import trio

from meshmerge.proto.varint import encode_uvarint

MAX_FRAME = 4 * 1024 * 1024
"""Largest frame we accept (p2pd's default persistent-connection limit)."""

_RECEIVE_CHUNK = 65536


class FramingError(Exception):
    """The peer sent a malformed or oversized frame, or closed mid-frame."""


def frame(payload: bytes) -> bytes:
    """`payload` prefixed with its varint length."""
    return encode_uvarint(len(payload)) + payload


class BufferedStream:
    """A trio stream plus a read buffer, for mixing framed and raw reads."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buf = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        chunk = await self.stream.receive_some(_RECEIVE_CHUNK)
        if not chunk:
            self._eof = True
            return False
        self._buf += chunk
        return True

    async def receive_some(self, max_bytes: int = _RECEIVE_CHUNK) -> bytes:
        """Buffered bytes first, then whatever the stream gives; b"" at EOF."""
        if not self._buf and not await self._fill():
            return b""
        out = bytes(self._buf[:max_bytes])
        del self._buf[:max_bytes]
        return out

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                raise FramingError(f"stream closed after {len(self._buf)} of {n} bytes")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_uvarint(self) -> int | None:
        """The next varint, or None on a clean EOF before its first byte."""
        value = 0
        for index in range(10):
            if not self._buf and not await self._fill():
                if index == 0:
                    return None
                raise FramingError("stream closed inside a varint")
            byte = self._buf[0]
            del self._buf[0]
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                return value
        raise FramingError("varint longer than 10 bytes")

    async def read_frame(self, max_size: int = MAX_FRAME) -> bytes | None:
        """The next length-prefixed frame, or None on a clean EOF between frames."""
        length = await self.read_uvarint()
        if length is None:
            return None
        if length > max_size:
            raise FramingError(f"frame of {length} bytes exceeds the {max_size}-byte limit")
        return await self.read_exactly(length)

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_frame(self, payload: bytes) -> None:
        await self.stream.send_all(frame(payload))

    async def send_eof(self) -> None:
        """Half-close our side if the transport supports it (unix and TCP sockets do)."""
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
