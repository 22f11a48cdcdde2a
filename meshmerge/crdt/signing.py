"""Ed25519 signatures with domain separation.

The node's libp2p identity key signs contributions too, so a contribution's
author is a peer id and anyone can check the signature from the id alone.
Each kind of signed object has its own domain prefix, so a signature over a
header can never be replayed as a signature over a removal.
"""

from __future__ import annotations

from typing import Final

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshmerge.proto.peerid import PeerIdError, peer_id_from_public_key, public_key_of

DOMAIN_HEADER: Final = b"meshmerge/v1/contribution-header\x00"
DOMAIN_REMOVAL: Final = b"meshmerge/v1/removal\x00"


class Signer:
    """A node identity able to sign (the private half never leaves this object)."""

    __slots__ = ("_key", "peer_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self._key = SigningKey(seed)
        self.peer_id = peer_id_from_public_key(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> Signer:
        return cls(bytes(SigningKey.generate()))

    def sign(self, domain: bytes, payload: bytes) -> bytes:
        return bytes(self._key.sign(domain + payload).signature)


def verify(peer_id: bytes, domain: bytes, payload: bytes, signature: bytes) -> bool:
    """True when `signature` is the peer's signature over domain + payload."""
    try:
        VerifyKey(public_key_of(peer_id)).verify(domain + payload, signature)
    except (BadSignatureError, PeerIdError, ValueError):
        return False
    return True
