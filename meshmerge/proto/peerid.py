"""libp2p peer ids for Ed25519 keys, without importing libp2p.

An Ed25519 peer id is the identity multihash of the protobuf-encoded public
key, so it embeds the key: anyone can check a signature from the id alone.
"""

from __future__ import annotations

from typing import Final

# identity multihash (0x00), length 36, protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
ED25519_PEER_ID_PREFIX: Final = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_LEN: Final = len(ED25519_PEER_ID_PREFIX) + 32
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


class PeerIdError(ValueError):
    pass


def peer_id_from_public_key(public_key: bytes) -> bytes:
    if len(public_key) != 32:
        raise PeerIdError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
    return ED25519_PEER_ID_PREFIX + public_key


def public_key_of(peer_id: bytes) -> bytes:
    """The Ed25519 public key inside a peer id; other key types are refused."""
    if len(peer_id) != PEER_ID_LEN or not peer_id.startswith(ED25519_PEER_ID_PREFIX):
        raise PeerIdError("only Ed25519 peer ids (identity multihash, 38 bytes) are accepted")
    return peer_id[len(ED25519_PEER_ID_PREFIX) :]


def to_base58(peer_id: bytes) -> str:
    """The usual text form (``12D3KooW…`` for Ed25519)."""
    n = int.from_bytes(peer_id, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    pad = len(peer_id) - len(peer_id.lstrip(b"\0"))
    return "1" * pad + out


def from_base58(text: str) -> bytes:
    n = 0
    for ch in text:
        digit = _B58.find(ch)
        if digit < 0:
            raise PeerIdError(f"invalid base58 character {ch!r} in peer id")
        n = n * 58 + digit
    pad = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    peer_id = b"\0" * pad + body
    public_key_of(peer_id)
    return peer_id
