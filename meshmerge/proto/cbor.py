"""Canonical CBOR with hard limits.

Theory of operation: every byte string from the network goes through
:func:`decode` before anything else looks at it. Decoding is two passes:

1. ``meshmerge.cext.cbor.scan`` (Cython) walks the raw bytes without building
   objects. It enforces the limits (total size, nesting depth, item count,
   string lengths) and proves the bytes are RFC 8949 §4.2.1 core
   deterministic encoding: shortest heads, definite lengths, no tags, only
   false/true/null, finite floats in their shortest exact width, integer or
   text map keys strictly increasing by their encoded bytes, valid UTF-8, no
   trailing bytes. It never allocates a declared length before checking it
   against the bytes that remain, so 9 bytes cannot make us allocate 2**64.
2. cbor2 builds the objects from the proven-safe bytes.

Canonical bytes make "same value ⇔ same bytes", which signatures and content
ids depend on; :func:`encode` writes exactly that form.

Every rejection is a :class:`CodecError` naming where it happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import cbor2

import meshmerge.cext.cbor as _cbor

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


def encode(value: Any) -> bytes:
    """Canonical encoding of a value built from int, str, bytes, bool, None, float, list, dict."""
    try:
        return _cbor.dumps(value)
    except ValueError as exc:
        raise CodecError("$", str(exc)) from None


def decode(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one canonical CBOR item, or raise CodecError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError("$", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_message_bytes:
        raise CodecError("$", f"message is {len(data)} bytes, limit {limits.max_message_bytes}")
    try:
        _cbor.scan(
            data,
            limits.max_depth,
            limits.max_items,
            limits.max_text_bytes,
            limits.max_bytes_bytes,
            limits.max_container_len,
        )
    except _cbor.ScanError as exc:
        raise CodecError(f"@{exc.offset}", exc.reason) from None
    try:
        return cbor2.loads(data, allow_indefinite=False, max_depth=limits.max_depth + 1)
    except Exception as exc:  # the scan proved the structure; anything here is a bug worth seeing
        raise CodecError("$", f"undecodable: {exc}") from None
