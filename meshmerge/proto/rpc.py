"""The local RPC wire protocol, shared by the daemon and the client. No I/O.

A frame is a 4-byte big-endian length followed by one canonical CBOR map.

* request:  ``{"id": uint, "method": text, "params": map, "fds": uint}``
* response: ``{"id": uint, "ok": true, "result": any}`` or
  ``{"id": uint, "ok": false, "error": {"code": text, "message": text}}``

Large tensors never travel inline when the caller can avoid it: a request may
carry open file descriptors (SCM_RIGHTS ancillary data sent with the frame's
first byte); ``fds`` says how many belong to it, and params refer to them by
index (``{"input_fd": 0}``). Nothing is ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from meshmerge.proto.cbor import CodecError, Limits, decode, encode

HEADER: Final = 4
MAX_FDS_PER_REQUEST: Final = 4


class ProtocolError(Exception):
    """The peer broke the framing; the connection must be closed."""


class RpcError(Exception):
    """An error a method reports to the caller: a stable code and a human message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    params: dict[str, Any]
    fds: int = 0

    def to_frame(self) -> bytes:
        return frame({"id": self.id, "method": self.method, "params": self.params, "fds": self.fds})


@dataclass(frozen=True)
class Response:
    id: int
    ok: bool
    result: Any = None
    error_code: str = ""
    error_message: str = ""

    def to_frame(self) -> bytes:
        body: dict[str, Any] = {"id": self.id, "ok": self.ok}
        if self.ok:
            body["result"] = self.result
        else:
            body["error"] = {"code": self.error_code, "message": self.error_message}
        return frame(body)

    def unwrap(self) -> Any:
        if not self.ok:
            raise RpcError(self.error_code, self.error_message)
        return self.result


def frame(body: dict[str, Any]) -> bytes:
    payload = encode(body)
    return len(payload).to_bytes(HEADER, "big") + payload


@dataclass
class FrameReader:
    """Accumulates bytes and yields decoded frames; refuses frames over the limit."""

    max_frame_bytes: int
    _buf: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER:
            length = int.from_bytes(self._buf[:HEADER], "big")
            if length > self.max_frame_bytes:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes}")
            if len(self._buf) < HEADER + length:
                break
            payload = bytes(self._buf[HEADER : HEADER + length])
            del self._buf[: HEADER + length]
            try:
                body = decode(
                    payload,
                    Limits(max_message_bytes=self.max_frame_bytes, max_bytes_bytes=self.max_frame_bytes),
                )
            except CodecError as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            if not isinstance(body, dict):
                raise ProtocolError("a frame must hold a map")
            out.append(body)
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def parse_request(body: dict[str, Any]) -> Request:
    rid, method, params, fds = body.get("id"), body.get("method"), body.get("params", {}), body.get("fds", 0)
    if type(rid) is not int or rid < 0:
        raise ProtocolError("request id must be an unsigned integer")
    if type(method) is not str or not method:
        raise RpcError("bad_request", "method must be a non-empty string")
    if not isinstance(params, dict):
        raise RpcError("bad_request", "params must be a map")
    if type(fds) is not int or not 0 <= fds <= MAX_FDS_PER_REQUEST:
        raise ProtocolError(f"fds must be 0..{MAX_FDS_PER_REQUEST}")
    return Request(rid, method, params, fds)


def parse_response(body: dict[str, Any]) -> Response:
    rid, ok = body.get("id"), body.get("ok")
    if type(rid) is not int or type(ok) is not bool:
        raise ProtocolError("malformed response")
    if ok:
        return Response(rid, True, body.get("result"))
    err = body.get("error")
    if not isinstance(err, dict):
        raise ProtocolError("malformed error response")
    return Response(
        rid, False, error_code=str(err.get("code", "error")), error_message=str(err.get("message", ""))
    )
