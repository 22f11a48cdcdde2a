"""AutoNAT v2 messages (libp2p/specs autonat/autonat-v2.md) in protobuf wire format.

Why hand-written: py-libp2p 0.8.1 ships only the v1 schema, and these six
messages use four protobuf field kinds (varint, fixed64, bytes, nested), so a
small strict codec is shorter than generated code and lets us bound every
field: addresses per request, bytes per address, data chunk size. Unknown
fields are skipped (proto3 rule); a malformed varint, a truncated field, an
impossible wire type or a bound exceeded raises ``WireError``.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from meshmerge.proto.varint import VarintError, encode_uvarint, read_uvarint

MAX_ADDRS = 64
"""Addresses accepted in one DialRequest (the rest are ignored by the server anyway)."""
MAX_ADDR_BYTES = 512
MAX_DATA_CHUNK = 4096
"""Spec: the ``data`` of one DialDataResponse is at most 4096 bytes."""


class WireError(ValueError):
    """Not an acceptable AutoNAT v2 message; the message says why."""


class ResponseStatus(enum.IntEnum):
    E_INTERNAL_ERROR = 0
    E_REQUEST_REJECTED = 100
    E_DIAL_REFUSED = 101
    OK = 200


class DialStatus(enum.IntEnum):
    UNUSED = 0
    E_DIAL_ERROR = 100
    E_DIAL_BACK_ERROR = 101
    OK = 200


@dataclasses.dataclass(frozen=True)
class DialRequest:
    addrs: tuple[bytes, ...]
    nonce: int


@dataclasses.dataclass(frozen=True)
class DialResponse:
    status: int
    addr_idx: int = 0
    dial_status: int = 0


@dataclasses.dataclass(frozen=True)
class DialDataRequest:
    addr_idx: int
    num_bytes: int


@dataclasses.dataclass(frozen=True)
class DialDataResponse:
    data: bytes


@dataclasses.dataclass(frozen=True)
class DialBack:
    nonce: int


@dataclasses.dataclass(frozen=True)
class DialBackResponse:
    status: int = 0  # DialBackStatus.OK


Message = DialRequest | DialResponse | DialDataRequest | DialDataResponse
"""What travels on ``/libp2p/autonat/2/dial-request`` (wrapped in the ``Message`` oneof)."""

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_ONEOF = {DialRequest: 1, DialResponse: 2, DialDataRequest: 3, DialDataResponse: 4}


# ----------------------------------------------------------------------------- primitives
def _varint(n: int) -> bytes:
    """Protobuf encodes negative int32/enum values as 64-bit two's complement."""
    return encode_uvarint(n & ((1 << 64) - 1))


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _len_field(field: int, data: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(data)) + data


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_uvarint(buf, pos)
    except VarintError as exc:
        raise WireError(str(exc)) from None


def _fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field, in order."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
            out.append((field, wire, value))
        elif wire == _FIXED64:
            if pos + 8 > len(buf):
                raise WireError("truncated fixed64")
            out.append((field, wire, struct.unpack_from("<Q", buf, pos)[0]))
            pos += 8
        elif wire == _FIXED32:
            if pos + 4 > len(buf):
                raise WireError("truncated fixed32")
            out.append((field, wire, struct.unpack_from("<I", buf, pos)[0]))
            pos += 4
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > len(buf):
                raise WireError("truncated length-delimited field")
            out.append((field, wire, bytes(buf[pos : pos + size])))
            pos += size
        else:
            raise WireError(f"unsupported wire type {wire}")
    return out


def _int(value: int | bytes, name: str) -> int:
    if isinstance(value, bytes):
        raise WireError(f"{name}: expected a number")
    return value


def _bytes(value: int | bytes, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{name}: expected bytes")
    return value


# ----------------------------------------------------------------------------- messages
def _encode_body(msg: Message | DialBack | DialBackResponse) -> bytes:
    if isinstance(msg, DialRequest):
        return (
            b"".join(_len_field(1, a) for a in msg.addrs) + _key(2, _FIXED64) + struct.pack("<Q", msg.nonce)
        )
    if isinstance(msg, DialResponse):
        return (
            _key(1, _VARINT)
            + _varint(msg.status)
            + _key(2, _VARINT)
            + _varint(msg.addr_idx)
            + _key(3, _VARINT)
            + _varint(msg.dial_status)
        )
    if isinstance(msg, DialDataRequest):
        return _key(1, _VARINT) + _varint(msg.addr_idx) + _key(2, _VARINT) + _varint(msg.num_bytes)
    if isinstance(msg, DialDataResponse):
        return _len_field(1, msg.data)
    if isinstance(msg, DialBack):
        return _key(1, _FIXED64) + struct.pack("<Q", msg.nonce)
    return _key(1, _VARINT) + _varint(msg.status)


def encode(msg: Message) -> bytes:
    """A ``Message`` (the oneof wrapper) for the dial-request stream."""
    return _len_field(_ONEOF[type(msg)], _encode_body(msg))


def encode_dial_back(msg: DialBack | DialBackResponse) -> bytes:
    """DialBack / DialBackResponse go on the dial-back stream unwrapped."""
    return _encode_body(msg)


def decode(buf: bytes) -> Message:
    """One ``Message`` from the dial-request stream."""
    chosen: tuple[int, bytes] | None = None
    for field, wire, value in _fields(buf):
        if field in (1, 2, 3, 4):
            if wire != _LEN:
                raise WireError(f"Message field {field}: wrong wire type")
            chosen = (field, _bytes(value, "Message"))  # oneof: the last one wins
    if chosen is None:
        raise WireError("Message has no known msg set")
    field, body = chosen
    fields = _fields(body)
    if field == 1:
        addrs: list[bytes] = []
        nonce = 0
        for f, _w, v in fields:
            if f == 1:
                a = _bytes(v, "DialRequest.addrs")
                if len(a) > MAX_ADDR_BYTES:
                    raise WireError(
                        f"DialRequest.addrs: an address of {len(a)} bytes (limit {MAX_ADDR_BYTES})"
                    )
                if len(addrs) >= MAX_ADDRS:
                    raise WireError(f"DialRequest.addrs: more than {MAX_ADDRS} addresses")
                addrs.append(a)
            elif f == 2:
                if _w != _FIXED64:
                    raise WireError("DialRequest.nonce: must be fixed64")
                nonce = _int(v, "DialRequest.nonce")
        return DialRequest(tuple(addrs), nonce)
    if field == 2:
        vals = {f: _int(v, f"DialResponse.{f}") for f, _w, v in fields if f in (1, 2, 3)}
        return DialResponse(vals.get(1, 0), vals.get(2, 0), vals.get(3, 0))
    if field == 3:
        vals = {f: _int(v, f"DialDataRequest.{f}") for f, _w, v in fields if f in (1, 2)}
        return DialDataRequest(vals.get(1, 0), vals.get(2, 0))
    data = b""
    for f, _w, v in fields:
        if f == 1:
            data = _bytes(v, "DialDataResponse.data")
    if len(data) > MAX_DATA_CHUNK:
        raise WireError(f"DialDataResponse.data: {len(data)} bytes (limit {MAX_DATA_CHUNK})")
    return DialDataResponse(data)


def decode_dial_back(buf: bytes) -> DialBack:
    nonce: int | None = None
    for f, w, v in _fields(buf):
        if f == 1:
            if w != _FIXED64:
                raise WireError("DialBack.nonce: must be fixed64")
            nonce = _int(v, "DialBack.nonce")
    if nonce is None:
        raise WireError("DialBack without a nonce")
    return DialBack(nonce)


def decode_dial_back_response(buf: bytes) -> DialBackResponse:
    status = 0
    for f, _w, v in _fields(buf):
        if f == 1:
            status = _int(v, "DialBackResponse.status")
    return DialBackResponse(status)
