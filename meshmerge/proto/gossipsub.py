"""Strict codec for the GossipSub RPC (schema: ``gossipsub.proto`` beside this file).

Why hand-written: a generated parser allocates the whole tree before anyone can
count it. This one checks every size and count *while* parsing against a
:class:`CodecLimits`, so hostile bytes cost at most O(len(input)) time and a
bounded amount of memory, and any malformed input raises a
:class:`GossipCodecError` subclass — never another exception.

Encoding writes fields in field-number order and omits absent fields, which is
the byte layout other libp2p implementations produce; message signatures are
computed over that layout (see :mod:`meshmerge.proto.gossipsub_sign`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from meshmerge.proto.varint import encode_uvarint

__all__ = [
    "RPC",
    "CodecLimits",
    "ControlGraft",
    "ControlIDontWant",
    "ControlIHave",
    "ControlIWant",
    "ControlMessage",
    "ControlPrune",
    "FrameDecoder",
    "GossipCodecError",
    "LimitExceededError",
    "MalformedError",
    "Message",
    "PeerInfo",
    "SubOpts",
    "TruncatedError",
    "decode_rpc",
    "encode_frame",
    "encode_message",
    "encode_rpc",
]


class GossipCodecError(ValueError):
    """Base class of every error the codec raises on bad input."""


class TruncatedError(GossipCodecError):
    """The input ended inside a varint, a length-delimited field or a frame."""


class MalformedError(GossipCodecError):
    """The bytes are not a valid encoding of the schema (bad wire type, bad UTF-8, ...)."""


class LimitExceededError(GossipCodecError):
    """The input is well-formed but exceeds a configured :class:`CodecLimits` bound."""


@dataclass(frozen=True, slots=True)
class CodecLimits:
    """Bounds enforced while decoding one RPC; each one names what it caps."""

    max_rpc_size: int = (1 << 20) + 64 * 1024  # 1 MiB message + control overhead
    max_subscriptions: int = 1024
    max_messages: int = 256
    max_topic_len: int = 1024
    max_message_id_len: int = 256
    max_control_entries: int = 5000  # ihave + iwant + graft + prune + idontwant entries
    max_message_ids: int = 10000  # message ids across all control entries
    max_prune_peers: int = 64
    max_peer_record_len: int = 4096
    max_peer_id_len: int = 128
    max_key_len: int = 1024
    max_signature_len: int = 1024
    max_seqno_len: int = 64

    def validate(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"CodecLimits.{name} must be a positive integer, got {value!r}")


DEFAULT_LIMITS = CodecLimits()


@dataclass(slots=True)
class SubOpts:
    subscribe: bool | None = None
    topic: str | None = None


@dataclass(slots=True)
class Message:
    from_peer: bytes | None = None
    data: bytes | None = None
    seqno: bytes | None = None
    topic: str | None = None
    signature: bytes | None = None
    key: bytes | None = None


@dataclass(slots=True)
class PeerInfo:
    peer_id: bytes | None = None
    signed_peer_record: bytes | None = None


@dataclass(slots=True)
class ControlIHave:
    topic: str | None = None
    message_ids: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class ControlIWant:
    message_ids: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class ControlGraft:
    topic: str | None = None


@dataclass(slots=True)
class ControlPrune:
    topic: str | None = None
    peers: list[PeerInfo] = field(default_factory=list)
    backoff: int | None = None


@dataclass(slots=True)
class ControlIDontWant:
    message_ids: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class ControlMessage:
    ihave: list[ControlIHave] = field(default_factory=list)
    iwant: list[ControlIWant] = field(default_factory=list)
    graft: list[ControlGraft] = field(default_factory=list)
    prune: list[ControlPrune] = field(default_factory=list)
    idontwant: list[ControlIDontWant] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.ihave or self.iwant or self.graft or self.prune or self.idontwant)


@dataclass(slots=True)
class RPC:
    subscriptions: list[SubOpts] = field(default_factory=list)
    publish: list[Message] = field(default_factory=list)
    control: ControlMessage | None = None

    def is_empty(self) -> bool:
        return (
            not self.subscriptions and not self.publish and (self.control is None or self.control.is_empty())
        )


# --------------------------------------------------------------------------- encoding

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_U64_MAX = (1 << 64) - 1




def _put_bytes(out: bytearray, fieldno: int, value: bytes) -> None:
    out.append((fieldno << 3) | _LEN)
    out += encode_uvarint(len(value))
    out += value


def _put_ids(out: bytearray, fieldno: int, ids: list[bytes]) -> None:
    tag = bytes(((fieldno << 3) | _LEN,))
    for mid in ids:
        n = len(mid)
        out += tag
        out += bytes((n,)) if n < 0x80 else encode_uvarint(n)
        out += mid


def _put_str(out: bytearray, fieldno: int, value: str) -> None:
    _put_bytes(out, fieldno, value.encode("utf-8"))


def encode_message(msg: Message) -> bytes:
    """Encode a pubsub ``Message`` (also the body that StrictSign signs)."""
    out = bytearray()
    if msg.from_peer is not None:
        _put_bytes(out, 1, msg.from_peer)
    if msg.data is not None:
        _put_bytes(out, 2, msg.data)
    if msg.seqno is not None:
        _put_bytes(out, 3, msg.seqno)
    if msg.topic is not None:
        _put_str(out, 4, msg.topic)
    if msg.signature is not None:
        _put_bytes(out, 5, msg.signature)
    if msg.key is not None:
        _put_bytes(out, 6, msg.key)
    return bytes(out)


def _encode_control(ctl: ControlMessage) -> bytes:
    out = bytearray()
    for ih in ctl.ihave:
        sub = bytearray()
        if ih.topic is not None:
            _put_str(sub, 1, ih.topic)
        _put_ids(sub, 2, ih.message_ids)
        _put_bytes(out, 1, bytes(sub))
    for iw in ctl.iwant:
        sub = bytearray()
        _put_ids(sub, 1, iw.message_ids)
        _put_bytes(out, 2, bytes(sub))
    for gr in ctl.graft:
        sub = bytearray()
        if gr.topic is not None:
            _put_str(sub, 1, gr.topic)
        _put_bytes(out, 3, bytes(sub))
    for pr in ctl.prune:
        sub = bytearray()
        if pr.topic is not None:
            _put_str(sub, 1, pr.topic)
        for pi in pr.peers:
            pib = bytearray()
            if pi.peer_id is not None:
                _put_bytes(pib, 1, pi.peer_id)
            if pi.signed_peer_record is not None:
                _put_bytes(pib, 2, pi.signed_peer_record)
            _put_bytes(sub, 2, bytes(pib))
        if pr.backoff is not None:
            if not 0 <= pr.backoff <= _U64_MAX:
                raise ValueError(f"ControlPrune.backoff out of uint64 range: {pr.backoff}")
            sub.append((3 << 3) | _VARINT)
            sub += encode_uvarint(pr.backoff)
        _put_bytes(out, 4, bytes(sub))
    for idw in ctl.idontwant:
        sub = bytearray()
        _put_ids(sub, 1, idw.message_ids)
        _put_bytes(out, 5, bytes(sub))
    return bytes(out)


def encode_rpc(rpc: RPC) -> bytes:
    """Encode an RPC body (without the length prefix)."""
    out = bytearray()
    for sub in rpc.subscriptions:
        sb = bytearray()
        if sub.subscribe is not None:
            sb += b"\x08\x01" if sub.subscribe else b"\x08\x00"
        if sub.topic is not None:
            _put_str(sb, 2, sub.topic)
        _put_bytes(out, 1, bytes(sb))
    for msg in rpc.publish:
        _put_bytes(out, 2, encode_message(msg))
    if rpc.control is not None:
        _put_bytes(out, 3, _encode_control(rpc.control))
    return bytes(out)


def encode_frame(rpc: RPC) -> bytes:
    """Encode an RPC with its uvarint length prefix, as written on the stream."""
    body = encode_rpc(rpc)
    return encode_uvarint(len(body)) + body


# --------------------------------------------------------------------------- decoding


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise TruncatedError("input ends inside a varint")
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise MalformedError("varint overflows 64 bits")
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedError("varint longer than 10 bytes")


def _read_field(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """Read one field at ``pos``: (field number, wire type, start, stop-or-value, next pos).

    For length-delimited fields (start, stop) bound the payload; for varints the value
    is in the fourth slot; fixed-width fields come back as wire type 1/5 with no payload.
    Groups are refused.
    """
    key, pos = _read_varint(buf, pos, end)
    fieldno, wt = key >> 3, key & 7
    if fieldno == 0:
        raise MalformedError("field number 0")
    if wt == _LEN:
        ln, pos = _read_varint(buf, pos, end)
        stop = pos + ln
        if stop > end:
            raise TruncatedError(f"field {fieldno} claims {ln} bytes, only {end - pos} left")
        return fieldno, wt, pos, stop, stop
    if wt == _VARINT:
        val, pos = _read_varint(buf, pos, end)
        return fieldno, wt, 0, val, pos
    if wt in (_I64, _I32):
        pos += 8 if wt == _I64 else 4
        if pos > end:
            raise TruncatedError("input ends inside a fixed-width field")
        return fieldno, wt, 0, 0, pos
    raise MalformedError(f"unsupported wire type {wt} (field {fieldno})")


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields in [pos, end), skipping fixed-width ones (no field of the schema uses them).

    A generator, so callers enforce their counts before the next field is read.
    """
    while pos < end:
        fieldno, wt, x, y, pos = _read_field(buf, pos, end)
        if wt in (_LEN, _VARINT):
            yield fieldno, wt, x, y


def _expect(wt: int, want: int, what: str) -> None:
    if wt != want:
        raise MalformedError(f"{what}: wire type {wt}, expected {want}")


def _bytes_field(buf: bytes, wt: int, a: int, b: int, limit: int, what: str) -> bytes:
    _expect(wt, _LEN, what)
    if b - a > limit:
        raise LimitExceededError(f"{what} is {b - a} bytes, limit {limit}")
    return buf[a:b]


def _str_field(buf: bytes, wt: int, a: int, b: int, limit: int, what: str) -> str:
    raw = _bytes_field(buf, wt, a, b, limit, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"{what} is not valid UTF-8") from exc


class _Counter:
    __slots__ = ("entries", "ids", "limits")

    def __init__(self, limits: CodecLimits) -> None:
        self.limits = limits
        self.entries = 0
        self.ids = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_control_entries:
            raise LimitExceededError(f"more than {self.limits.max_control_entries} control entries")

    def mid(self) -> None:
        self.ids += 1
        if self.ids > self.limits.max_message_ids:
            raise LimitExceededError(f"more than {self.limits.max_message_ids} message ids in control")


def _decode_message(buf: bytes, a: int, b: int, lim: CodecLimits) -> Message:
    msg = Message()
    for fno, wt, x, y in _fields(buf, a, b):
        if fno == 1:
            msg.from_peer = _bytes_field(buf, wt, x, y, lim.max_peer_id_len, "Message.from")
        elif fno == 2:
            msg.data = _bytes_field(buf, wt, x, y, lim.max_rpc_size, "Message.data")
        elif fno == 3:
            msg.seqno = _bytes_field(buf, wt, x, y, lim.max_seqno_len, "Message.seqno")
        elif fno == 4:
            if msg.topic is not None:
                raise MalformedError("Message carries more than one topic")
            msg.topic = _str_field(buf, wt, x, y, lim.max_topic_len, "Message.topic")
        elif fno == 5:
            msg.signature = _bytes_field(buf, wt, x, y, lim.max_signature_len, "Message.signature")
        elif fno == 6:
            msg.key = _bytes_field(buf, wt, x, y, lim.max_key_len, "Message.key")
    return msg


def _decode_ids(
    buf: bytes, a: int, b: int, fieldno: int, cnt: _Counter, what: str, topic_field: bool
) -> tuple[str | None, list[bytes]]:
    """Repeated message ids (the bulk of IHAVE/IWANT/IDONTWANT traffic), with a fast path
    for one-byte keys and lengths; anything else goes through the generic field reader."""
    lim = cnt.limits
    topic: str | None = None
    ids: list[bytes] = []
    id_key = (fieldno << 3) | _LEN
    max_len = lim.max_message_id_len
    pos = a
    while pos < b:
        if buf[pos] == id_key and pos + 1 < b and buf[pos + 1] < 0x80:
            ln = buf[pos + 1]
            start = pos + 2
            stop = start + ln
            if stop > b:
                raise TruncatedError(f"{what}.messageIDs claims {ln} bytes, only {b - start} left")
            if ln > max_len:
                raise LimitExceededError(f"{what}.messageIDs is {ln} bytes, limit {max_len}")
            cnt.mid()
            ids.append(buf[start:stop])
            pos = stop
            continue
        fno, wt, x, y, pos = _read_field(buf, pos, b)
        if topic_field and fno == 1:
            topic = _str_field(buf, wt, x, y, lim.max_topic_len, f"{what}.topicID")
        elif fno == fieldno:
            cnt.mid()
            ids.append(_bytes_field(buf, wt, x, y, max_len, f"{what}.messageIDs"))
    return topic, ids


def _decode_prune(buf: bytes, a: int, b: int, lim: CodecLimits) -> ControlPrune:
    pr = ControlPrune()
    for fno, wt, x, y in _fields(buf, a, b):
        if fno == 1:
            pr.topic = _str_field(buf, wt, x, y, lim.max_topic_len, "ControlPrune.topicID")
        elif fno == 2:
            _expect(wt, _LEN, "ControlPrune.peers")
            if len(pr.peers) >= lim.max_prune_peers:
                raise LimitExceededError(f"PRUNE carries more than {lim.max_prune_peers} peers")
            pi = PeerInfo()
            for f2, w2, x2, y2 in _fields(buf, x, y):
                if f2 == 1:
                    pi.peer_id = _bytes_field(buf, w2, x2, y2, lim.max_peer_id_len, "PeerInfo.peerID")
                elif f2 == 2:
                    pi.signed_peer_record = _bytes_field(
                        buf, w2, x2, y2, lim.max_peer_record_len, "PeerInfo.signedPeerRecord"
                    )
            pr.peers.append(pi)
        elif fno == 3:
            _expect(wt, _VARINT, "ControlPrune.backoff")
            pr.backoff = y
    return pr


def _decode_control(buf: bytes, a: int, b: int, lim: CodecLimits) -> ControlMessage:
    ctl = ControlMessage()
    cnt = _Counter(lim)
    for fno, wt, x, y in _fields(buf, a, b):
        if fno == 1:
            _expect(wt, _LEN, "ControlMessage.ihave")
            cnt.entry()
            topic, ids = _decode_ids(buf, x, y, 2, cnt, "ControlIHave", True)
            ctl.ihave.append(ControlIHave(topic, ids))
        elif fno == 2:
            _expect(wt, _LEN, "ControlMessage.iwant")
            cnt.entry()
            ctl.iwant.append(ControlIWant(_decode_ids(buf, x, y, 1, cnt, "ControlIWant", False)[1]))
        elif fno == 3:
            _expect(wt, _LEN, "ControlMessage.graft")
            cnt.entry()
            gr = ControlGraft()
            for f2, w2, x2, y2 in _fields(buf, x, y):
                if f2 == 1:
                    gr.topic = _str_field(buf, w2, x2, y2, lim.max_topic_len, "ControlGraft.topicID")
            ctl.graft.append(gr)
        elif fno == 4:
            _expect(wt, _LEN, "ControlMessage.prune")
            cnt.entry()
            ctl.prune.append(_decode_prune(buf, x, y, lim))
        elif fno == 5:
            _expect(wt, _LEN, "ControlMessage.idontwant")
            cnt.entry()
            ctl.idontwant.append(
                ControlIDontWant(_decode_ids(buf, x, y, 1, cnt, "ControlIDontWant", False)[1])
            )
    return ctl


def decode_rpc(data: bytes, limits: CodecLimits = DEFAULT_LIMITS) -> RPC:
    """Decode one RPC body; raises :class:`GossipCodecError` on anything malformed or too big."""
    if len(data) > limits.max_rpc_size:
        raise LimitExceededError(f"RPC is {len(data)} bytes, limit {limits.max_rpc_size}")
    buf = bytes(data)
    rpc = RPC()
    for fno, wt, x, y in _fields(buf, 0, len(buf)):
        if fno == 1:
            _expect(wt, _LEN, "RPC.subscriptions")
            if len(rpc.subscriptions) >= limits.max_subscriptions:
                raise LimitExceededError(f"more than {limits.max_subscriptions} subscriptions in one RPC")
            so = SubOpts()
            for f2, w2, x2, y2 in _fields(buf, x, y):
                if f2 == 1:
                    _expect(w2, _VARINT, "SubOpts.subscribe")
                    so.subscribe = y2 != 0
                elif f2 == 2:
                    so.topic = _str_field(buf, w2, x2, y2, limits.max_topic_len, "SubOpts.topicid")
            rpc.subscriptions.append(so)
        elif fno == 2:
            _expect(wt, _LEN, "RPC.publish")
            if len(rpc.publish) >= limits.max_messages:
                raise LimitExceededError(f"more than {limits.max_messages} messages in one RPC")
            rpc.publish.append(_decode_message(buf, x, y, limits))
        elif fno == 3:
            _expect(wt, _LEN, "RPC.control")
            ctl = _decode_control(buf, x, y, limits)
            if rpc.control is None:
                rpc.control = ctl
            else:  # protobuf merges repeated occurrences of an embedded message
                rpc.control.ihave += ctl.ihave
                rpc.control.iwant += ctl.iwant
                rpc.control.graft += ctl.graft
                rpc.control.prune += ctl.prune
                rpc.control.idontwant += ctl.idontwant
    return rpc


class FrameDecoder:
    """Incremental decoder for a stream of uvarint length-prefixed RPCs.

    Holds at most one partial frame (≤ ``max_rpc_size`` plus a 10-byte prefix);
    a frame announcing more than the limit raises before any of it is buffered.
    """

    def __init__(self, limits: CodecLimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[RPC]:
        self._buf += chunk
        out: list[RPC] = []
        while self._buf:
            buf = bytes(self._buf[:10])
            try:
                ln, hdr = _read_varint(buf, 0, len(buf))
            except TruncatedError:
                if len(self._buf) >= 10:
                    raise MalformedError("frame length prefix longer than 10 bytes") from None
                break
            if ln > self._limits.max_rpc_size:
                raise LimitExceededError(f"frame announces {ln} bytes, limit {self._limits.max_rpc_size}")
            if len(self._buf) < hdr + ln:
                break
            body = bytes(self._buf[hdr : hdr + ln])
            del self._buf[: hdr + ln]
            out.append(decode_rpc(body, self._limits))
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)
