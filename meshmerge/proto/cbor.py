"""Canonical CBOR with hard limits.

Theory of operation: every byte string from the network goes through
:func:`decode` before anything else looks at it. Decoding is two passes:

1. :func:`_scan` walks the raw bytes without building objects. It enforces the
   limits (total size, nesting depth, item count, string lengths), rejects
   indefinite lengths, tags, non-minimal length heads, simple values other
   than false/true/null, invalid UTF-8 and trailing bytes. Because it never
   allocates a declared length before checking it against the bytes that
   remain, a 9-byte message cannot make us allocate 2**64 bytes.
2. cbor2 builds the objects, and we re-encode them canonically (RFC 8949
   §4.2.1 core deterministic encoding: shortest heads, shortest float that
   keeps the value, map keys sorted bytewise by encoding). If the bytes differ,
   the input was not canonical (unsorted or duplicate keys, long floats) and is
   rejected. This makes "same value ⇔ same bytes", which signatures and
   content ids depend on.

Every rejection is a :class:`CodecError` naming where it happened.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import cbor2

__all__ = ["DEFAULT_LIMITS", "CodecError", "Limits", "decode", "encode"]


class CodecError(ValueError):
    """Input is not an acceptable canonical CBOR message.

    ``field`` is a path into the message (``$`` is the root) or a byte
    offset (``@123``) when the raw structure is broken before any field.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on one decoded message; each is a named config value."""

    max_message_bytes: int = 16 * 1024 * 1024
    max_depth: int = 16
    max_items: int = 1_000_000
    max_text_bytes: int = 64 * 1024
    max_bytes_bytes: int = 4 * 1024 * 1024
    max_container_len: int = 200_000

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_depth",
            "max_items",
            "max_text_bytes",
            "max_bytes_bytes",
            "max_container_len",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS: Final = Limits()

_MAJOR_UINT, _MAJOR_NINT, _MAJOR_BYTES, _MAJOR_TEXT = 0, 1, 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG, _MAJOR_SIMPLE = 4, 5, 6, 7
_KEY_MAJORS = frozenset({_MAJOR_UINT, _MAJOR_NINT, _MAJOR_TEXT})


def encode(value: Any) -> bytes:
    """Canonical encoding of a value built from int, str, bytes, bool, None, float, list, dict."""
    _check_encodable(value, "$", 0)
    return cbor2.dumps(value, canonical=True)


def _check_encodable(value: Any, path: str, depth: int) -> None:
    if depth > DEFAULT_LIMITS.max_depth:
        raise CodecError(path, f"nesting deeper than {DEFAULT_LIMITS.max_depth}")
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not -(2**64) <= value < 2**64:
            raise CodecError(path, "integer outside the 64-bit CBOR range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError(path, "NaN and infinities are not allowed")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_encodable(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise CodecError(path, f"map key {key!r} must be a text string or integer")
            _check_encodable(item, f"{path}.{key}", depth + 1)
        return
    raise CodecError(path, f"type {type(value).__name__} cannot be encoded")


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one canonical CBOR item, or raise CodecError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("$", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise CodecError("$", f"message is {len(data)} bytes, limit {limits.max_message_bytes}")
    if not data:
        raise CodecError("@0", "empty input")
    scanner = _Scanner(data, limits)
    end = scanner.item(0, 0)
    if end != len(data):
        raise CodecError(f"@{end}", f"{len(data) - end} trailing bytes after the item")
    try:
        value = cbor2.loads(data, allow_indefinite=False, max_depth=limits.max_depth + 1)
    except Exception as exc:  # cbor2 raises several types; all mean "bad input"
        raise CodecError("$", f"undecodable: {exc}") from None
    try:
        again = cbor2.dumps(value, canonical=True)
    except Exception as exc:
        raise CodecError("$", f"cannot re-encode: {exc}") from None
    if again != data:
        raise CodecError("$", "not canonical CBOR (key order, duplicate keys or float width)")
    return value


class _Scanner:
    """Walks raw CBOR, checking structure and limits without building values."""

    __slots__ = ("data", "items", "limits")

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.limits = limits
        self.items = 0

    def _head(self, pos: int) -> tuple[int, int, int, int]:
        """Return (major, info, argument, position after the head)."""
        data = self.data
        if pos >= len(data):
            raise CodecError(f"@{pos}", "truncated: expected an item")
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        pos += 1
        if info < 24:
            return major, info, info, pos
        if info > 27:
            if info == 31:
                raise CodecError(f"@{pos - 1}", "indefinite-length items are not allowed")
            raise CodecError(f"@{pos - 1}", f"reserved additional information {info}")
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise CodecError(f"@{pos}", "truncated item head")
        arg = int.from_bytes(data[pos : pos + width], "big")
        if major != _MAJOR_SIMPLE:
            minimal = 24 if width == 1 else 1 << (8 * (width >> 1))
            if arg < minimal:
                raise CodecError(f"@{pos - 1}", "non-minimal length or integer encoding")
        return major, info, arg, pos + width

    def item(self, pos: int, depth: int) -> int:
        if depth > self.limits.max_depth:
            raise CodecError(f"@{pos}", f"nesting deeper than {self.limits.max_depth}")
        self.items += 1
        if self.items > self.limits.max_items:
            raise CodecError(f"@{pos}", f"more than {self.limits.max_items} items")
        start = pos
        major, info, arg, pos = self._head(pos)
        if major in (_MAJOR_UINT, _MAJOR_NINT):
            return pos
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            limit = self.limits.max_bytes_bytes if major == _MAJOR_BYTES else self.limits.max_text_bytes
            if arg > limit:
                raise CodecError(f"@{start}", f"string of {arg} bytes exceeds limit {limit}")
            if pos + arg > len(self.data):
                raise CodecError(f"@{start}", "truncated string")
            if major == _MAJOR_TEXT:
                try:
                    self.data[pos : pos + arg].decode("utf-8")
                except UnicodeDecodeError:
                    raise CodecError(f"@{start}", "text string is not valid UTF-8") from None
            return pos + arg
        if major in (_MAJOR_ARRAY, _MAJOR_MAP):
            if arg > self.limits.max_container_len:
                raise CodecError(
                    f"@{start}", f"container of {arg} entries exceeds limit {self.limits.max_container_len}"
                )
            # Every entry needs at least one byte: reject impossible counts before looping.
            entries = arg * (2 if major == _MAJOR_MAP else 1)
            if entries > len(self.data) - pos:
                raise CodecError(f"@{start}", "truncated container")
            for i in range(entries):
                if (
                    major == _MAJOR_MAP
                    and i % 2 == 0
                    and self.data[pos : pos + 1]
                    and self.data[pos] >> 5 not in _KEY_MAJORS
                ):
                    raise CodecError(f"@{pos}", "map keys must be text strings or integers")
                pos = self.item(pos, depth + 1)
            return pos
        if major == _MAJOR_TAG:
            raise CodecError(f"@{start}", f"tag {arg} is not allowed")
        # major 7: simple values and floats
        if info in (20, 21, 22):
            return pos
        if info in (25, 26, 27):
            width = 1 << (info - 24)
            raw = self.data[pos - width : pos]
            value = cbor2.loads(bytes([0xE0 | info]) + raw)
            if not math.isfinite(value):
                raise CodecError(f"@{start}", "NaN and infinities are not allowed")
            return pos
        raise CodecError(f"@{start}", f"simple value {arg} is not allowed")
