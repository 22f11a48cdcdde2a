"""`/ipfs/kad/1.0.0` framing and message parsing with hard limits.

Messages are unsigned-varint length-prefixed protobuf `Message`s (the schema
shipped with py-libp2p as `kademlia_pb2`). A frame longer than the limit is
refused before its body is read; peer lists and address lists are truncated to
fixed caps and malformed entries dropped, so a hostile response costs a bounded
amount of memory and work.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.stream.exceptions import StreamEOF
from multiaddr import Multiaddr

log = logging.getLogger("meshmerge.dht")

PROTOCOL_ID = "/ipfs/kad/1.0.0"
MAX_PEERS_PER_MESSAGE = 40
MAX_ADDRS_PER_PEER = 16
MAX_ADDR_BYTES = 256


class WireError(Exception):
    """A frame or message broke the protocol or a limit."""


class PeerClosed(WireError):
    """The remote closed the stream cleanly between messages (a normal end)."""


def encode_frame(msg: Message) -> bytes:
    body = msg.SerializeToString()
    n = len(body)
    head = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            head.append(byte | 0x80)
        else:
            head.append(byte)
            break
    return bytes(head) + body


class FrameReader:
    """Reads frames from a libp2p stream, buffering whatever `read` returns."""

    def __init__(self, stream: object, max_bytes: int) -> None:
        self.stream = stream
        self.max_bytes = max_bytes
        self._buf = bytearray()

    async def _fill(self) -> bool:
        try:
            chunk = await self.stream.read(65536)  # type: ignore[attr-defined]
        except StreamEOF:
            return False
        if not chunk:
            return False
        self._buf += chunk
        return True

    async def read(self) -> Message:
        length = shift = 0
        pos = 0
        while True:
            if pos >= len(self._buf) and not await self._fill():
                if pos == 0 and not self._buf:
                    raise PeerClosed("stream closed")
                raise WireError("stream closed inside a frame header")
            byte = self._buf[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 35:
                raise WireError("frame length varint too long")
        if length > self.max_bytes:
            raise WireError(f"frame of {length} bytes exceeds max_message_bytes={self.max_bytes}")
        while len(self._buf) - pos < length:
            if not await self._fill():
                raise WireError("stream closed inside a frame body")
        body = bytes(self._buf[pos : pos + length])
        del self._buf[: pos + length]
        msg = Message()
        try:
            msg.ParseFromString(body)
        except Exception as exc:
            raise WireError(f"undecodable protobuf message ({exc.__class__.__name__})") from exc
        return msg


@dataclass(frozen=True)
class PeerRecord:
    peer: bytes
    addrs: tuple[Multiaddr, ...]


@functools.lru_cache(maxsize=8192)
def parse_addr(raw: bytes) -> Multiaddr | None:
    """A binary multiaddr, fully checked. py-multiaddr parses bytes lazily, so
    garbage would otherwise enter the peerstore and fail much later. Cached:
    every lookup reply repeats the same few addresses, and parsing dominated
    the CPU cost of handling a FIND_NODE reply."""
    try:
        addr = Multiaddr(raw)
        str(addr)
        addr.protocols()
    except Exception:
        return None
    return addr


def parse_peers(peers: Iterable[Message.Peer]) -> list[PeerRecord]:
    """Decode `closerPeers` / `providerPeers`, dropping malformed ids and addresses."""
    out: list[PeerRecord] = []
    for i, p in enumerate(peers):
        if i >= MAX_PEERS_PER_MESSAGE:
            break
        if not 2 <= len(p.id) <= 128 or p.id[0] not in (0x00, 0x12):
            log.debug("dropping peer entry with malformed id (not an identity or sha2-256 multihash)")
            continue
        addrs: list[Multiaddr] = []
        for raw in list(p.addrs)[:MAX_ADDRS_PER_PEER]:
            if len(raw) > MAX_ADDR_BYTES:
                continue
            raw = bytes(raw)
            addr = parse_addr(raw)
            if addr is None:
                log.debug("dropping malformed multiaddr from peer entry")
            else:
                addrs.append(addr)
        out.append(PeerRecord(bytes(p.id), tuple(addrs)))
    return out


def peer_entry(peer: bytes, addrs: list[Multiaddr] | tuple[Multiaddr, ...], connected: bool) -> Message.Peer:
    entry = Message.Peer()
    entry.id = peer
    entry.addrs.extend(a.to_bytes() for a in list(addrs)[:MAX_ADDRS_PER_PEER])
    entry.connection = Message.CONNECTED if connected else Message.NOT_CONNECTED
    return entry
