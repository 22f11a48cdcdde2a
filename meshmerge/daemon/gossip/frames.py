"""Encode outgoing RPC frames with each message's bytes computed once per batch.

A forwarded message goes into the RPC of every mesh peer, and an own publish
into the RPC of every topic peer; encoding each RPC from scratch re-encodes the
same message once per peer. :class:`FrameEncoder` remembers, for the lifetime
of one batch (the router's flush), the encoded ``publish`` field of each message
object and splices it into every frame that carries it. The bytes are exactly
those of :func:`~meshmerge.proto.gossipsub.encode_frame` (tests check it):
fields in number order, subscriptions, then messages, then control.
"""

from __future__ import annotations

from meshmerge.proto.gossipsub import RPC, Message, encode_frame, encode_message, encode_rpc, uvarint

__all__ = ["FrameEncoder"]

_PUBLISH_TAG = b"\x12"  # RPC field 2 (publish), wire type 2 (length-delimited)


class FrameEncoder:
    """``encode(rpc)`` == ``encode_frame(rpc)``, reusing message encodings until :meth:`reset`.

    Entries are keyed by object identity and hold the object, so an id cannot be
    reused by another message while its entry lives; :meth:`reset` after each
    batch keeps the memo as small as one batch.
    """

    __slots__ = ("_memo", "hits")

    def __init__(self) -> None:
        self._memo: dict[int, tuple[Message, bytes]] = {}
        self.hits = 0

    def _publish_field(self, msg: Message) -> bytes:
        entry = self._memo.get(id(msg))
        if entry is not None and entry[0] is msg:
            self.hits += 1
            return entry[1]
        body = encode_message(msg)
        field = _PUBLISH_TAG + uvarint(len(body)) + body
        self._memo[id(msg)] = (msg, field)
        return field

    def encode(self, rpc: RPC) -> bytes:
        if not rpc.publish:
            return encode_frame(rpc)
        parts: list[bytes] = []
        if rpc.subscriptions:
            parts.append(encode_rpc(RPC(subscriptions=rpc.subscriptions)))
        parts.extend(self._publish_field(m) for m in rpc.publish)
        if rpc.control is not None:
            parts.append(encode_rpc(RPC(control=rpc.control)))
        body = b"".join(parts)
        return uvarint(len(body)) + body

    def reset(self) -> None:
        self._memo.clear()
