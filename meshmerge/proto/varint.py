"""Unsigned LEB128 varints as protobuf, multiformats and libp2p framing use them.

One encoder and one bounds-checked decoder for every wire format that is not
on a measured hot path (the GossipSub decoder keeps its own inlined loop).
Values are limited to 64 bits, as protobuf and the multiformats spec require,
so a hostile peer cannot make us build an arbitrarily large integer.
"""

from __future__ import annotations

__all__ = ["MAX_VARINT_BYTES", "VarintError", "encode_uvarint", "read_uvarint"]

MAX_VARINT_BYTES = 10
_U64_LIMIT = 1 << 64


class VarintError(ValueError):
    """A varint is truncated, longer than 10 bytes, or over 64 bits.

    ``truncated`` tells a short buffer (more bytes might fix it) from a
    malformed one, so stream readers can wait for data instead of failing.
    """

    def __init__(self, message: str, *, truncated: bool = False) -> None:
        super().__init__(message)
        self.truncated = truncated


def encode_uvarint(value: int) -> bytes:
    """The varint bytes of ``0 <= value < 2**64``."""
    if not 0 <= value < _U64_LIMIT:
        raise ValueError(f"uvarint must be non-negative and below 2**64, got {value}")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_uvarint(
    buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None
) -> tuple[int, int]:
    """(value, position after it) of the varint at ``buf[pos:end]``."""
    stop = len(buf) if end is None else end
    value = shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= stop:
            raise VarintError("input ends inside a varint", truncated=True)
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >= _U64_LIMIT:
                raise VarintError("varint overflows 64 bits")
            return value, pos + i + 1
        shift += 7
    raise VarintError("varint longer than 10 bytes")
