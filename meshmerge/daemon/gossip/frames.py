"""Encode outgoing RPC frames with each message's bytes computed once per batch.

A forwarded message goes into the RPC of every mesh peer, and an own publish
into the RPC of every topic peer; encoding each RPC from scratch re-encodes the
same message once per peer. :class:`FrameEncoder` remembers, for the lifetime
of one batch (the router's flush), the encoded ``publish`` field of each message
object and splices it into every frame that carries it. The bytes are exactly
those of :func:`~meshmerge.proto.gossipsub.encode_frame` (tests check it):
fields in number order, subscriptions, then messages, then control.

IHAVE entries get the same treatment: the heartbeat sends one IHAVE object (the
same message ids) to every gossip target, so its encoded ``ihave`` field is
computed once per batch and spliced in front of the rest of each control message
(``ihave`` is the control message's first field).
"""

from __future__ import annotations

from meshmerge.proto.gossipsub import (
    RPC,
    ControlIHave,
    ControlMessage,
    Message,
    encode_frame,
    encode_message,
    encode_rpc,
)
from meshmerge.proto.varint import encode_uvarint

__all__ = ["FrameEncoder"]

_PUBLISH_TAG = b"\x12"  # RPC field 2 (publish), wire type 2 (length-delimited)
_CONTROL_TAG = b"\x1a"  # RPC field 3 (control), wire type 2


def _field_value(encoded: bytes) -> bytes:
    """The value of the single length-delimited field ``encoded`` (tag byte, uvarint length, value)."""
    i = 1
    while encoded[i] & 0x80:
        i += 1
    return encoded[i + 1 :]


class FrameEncoder:
    """``encode(rpc)`` == ``encode_frame(rpc)``, reusing message encodings until :meth:`reset`.

    Entries are keyed by object identity and hold the object, so an id cannot be
    reused by another message while its entry lives; :meth:`reset` after each
    batch keeps the memo as small as one batch.
    """

    __slots__ = ("_ihave_memo", "_memo", "hits")

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Message, bytes]] = {}
        self._ihave_memo: dict[int, tuple[ControlIHave, bytes]] = {}
        self.hits = 0

    def _publish_field(self, msg: Message) -> bytes:
        entry = self._memo.get(id(msg))
        if entry is not None and entry[0] is msg:
            self.hits += 1
            return entry[1]
        body = encode_message(msg)
        field = _PUBLISH_TAG + encode_uvarint(len(body)) + body
        self._memo[id(msg)] = (msg, field)
        return field

    def _ihave_field(self, ih: ControlIHave) -> bytes:
        """The control message's ``ihave`` field (tag, length, value) for one entry."""
        entry = self._ihave_memo.get(id(ih))
        if entry is not None and entry[0] is ih:
            self.hits += 1
            return entry[1]
        field = _field_value(encode_rpc(RPC(control=ControlMessage(ihave=[ih]))))
        self._ihave_memo[id(ih)] = (ih, field)
        return field

    def _control_field(self, ctl: ControlMessage) -> bytes:
        if not ctl.ihave:
            return encode_rpc(RPC(control=ctl))
        parts = [self._ihave_field(ih) for ih in ctl.ihave]
        if ctl.iwant or ctl.graft or ctl.prune or ctl.idontwant:
            rest = ControlMessage(iwant=ctl.iwant, graft=ctl.graft, prune=ctl.prune, idontwant=ctl.idontwant)
            parts.append(_field_value(encode_rpc(RPC(control=rest))))
        body = b"".join(parts)
        return _CONTROL_TAG + encode_uvarint(len(body)) + body

    def encode(self, rpc: RPC) -> bytes:
        ctl = rpc.control
        if not rpc.publish and (ctl is None or not ctl.ihave):
            return encode_frame(rpc)
        parts: list[bytes] = []
        if rpc.subscriptions:
            parts.append(encode_rpc(RPC(subscriptions=rpc.subscriptions)))
        parts.extend(self._publish_field(m) for m in rpc.publish)
        if ctl is not None:
            parts.append(self._control_field(ctl))
        body = b"".join(parts)
        return encode_uvarint(len(body)) + body

    def reset(self) -> None:
        self._memo.clear()
        self._ihave_memo.clear()
