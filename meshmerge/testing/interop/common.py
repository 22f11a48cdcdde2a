"""Values shared by the go and js peer drivers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from multiaddr import Multiaddr


@dataclass(frozen=True)
class PeerInfo:
    peer_id: ID
    addrs: tuple[Multiaddr, ...]


@dataclass(frozen=True)
class PubsubMessage:
    """A message a peer received on a subscription.

    `received_at` is `time.monotonic()` seconds (CLOCK_MONOTONIC, shared by all
    processes on the machine): taken in node itself for the js peer, and when
    the driver reads it off the control socket for the go peer.
    """

    topic: str
    data: bytes
    from_peer: ID | None
    seqno: bytes
    received_at: float = field(compare=False)


def raw_cid(data: bytes) -> bytes:
    """Binary CIDv1 (raw codec 0x55, sha2-256 multihash) of `data`, as provider records use."""
    return bytes([0x01, 0x55, 0x12, 0x20]) + hashlib.sha256(data).digest()


def pk_record() -> tuple[bytes, bytes]:
    """A fresh valid `/pk/` DHT record: (b"/pk/" + peer id bytes, serialized public key).

    go's DHT accepts only `/pk/` and `/ipns/` keys; `/pk/` records are checked by
    the standard public-key validator (key must hash to the peer id) that go, js
    and any libp2p DHT implement, so they carry put/get interop tests with go.
    """
    key_pair = create_new_key_pair()
    peer_id = ID.from_pubkey(key_pair.public_key)
    return b"/pk/" + peer_id.to_bytes(), key_pair.public_key.serialize()
