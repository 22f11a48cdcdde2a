"""StrictSign for pubsub messages, with libp2p's key and peer-id formats.

Facts this module follows (libp2p peer-id and pubsub specs):

* A public key is serialised as the protobuf ``PublicKey {KeyType Type = 1; bytes Data = 2}``
  (Ed25519 = 1, data = the 32 raw key bytes).
* A peer id is the multihash of that serialisation; keys of at most 42 bytes
  (Ed25519's is 36) use the *identity* multihash ``0x00 ‖ len ‖ bytes``, so the
  key can be recovered from the id and the message's ``key`` field stays empty.
* The signature covers ``b"libp2p-pubsub:" ‖ encode(Message without signature and key)``.
* The standard message id is ``from ‖ seqno``.

Only Ed25519 keys are supported; a message signed with another key type is
refused with :class:`UnsupportedKeyError` (a typed rejection, never a crash).
"""

from __future__ import annotations

import nacl.exceptions
import nacl.signing

from meshmerge.proto.gossipsub import Message, encode_message

__all__ = [
    "SIGN_PREFIX",
    "Ed25519Identity",
    "InvalidSignatureError",
    "MissingSignatureError",
    "SignatureError",
    "UnsupportedKeyError",
    "message_id",
    "peer_id_from_ed25519",
    "public_key_from_peer_id",
    "sign_message",
    "verify_message",
]

SIGN_PREFIX = b"libp2p-pubsub:"
KEY_TYPE_ED25519 = 1
_ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"  # PublicKey{Type=Ed25519, Data=<32 bytes>}
_IDENTITY_MH = b"\x00\x24"  # identity multihash, 36 bytes of digest


class SignatureError(ValueError):
    """A message failed StrictSign verification; ``reason`` is a stable short tag."""

    reason = "invalid signature"


class MissingSignatureError(SignatureError):
    reason = "missing signature"


class InvalidSignatureError(SignatureError):
    reason = "invalid signature"


class UnsupportedKeyError(SignatureError):
    reason = "unsupported key"


def marshal_ed25519_public_key(raw: bytes) -> bytes:
    if len(raw) != 32:
        raise UnsupportedKeyError(f"Ed25519 public key must be 32 bytes, got {len(raw)}")
    return _ED25519_KEY_PREFIX + raw


def peer_id_from_ed25519(raw_public_key: bytes) -> bytes:
    """Peer id bytes (identity multihash) of an Ed25519 public key."""
    return _IDENTITY_MH + marshal_ed25519_public_key(raw_public_key)


def _unmarshal_public_key(data: bytes) -> bytes:
    if len(data) == 36 and data.startswith(_ED25519_KEY_PREFIX):
        return data[4:]
    raise UnsupportedKeyError("only Ed25519 public keys are supported")


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """Raw Ed25519 key inlined in an identity-multihash peer id."""
    if len(peer_id) == 38 and peer_id.startswith(_IDENTITY_MH):
        return _unmarshal_public_key(peer_id[2:])
    raise UnsupportedKeyError("peer id does not inline an Ed25519 key")


def message_id(msg: Message) -> bytes:
    """The standard message id: ``from ‖ seqno``."""
    return (msg.from_peer or b"") + (msg.seqno or b"")


class Ed25519Identity:
    """A node's Ed25519 identity: signs pubsub messages and knows its peer id."""

    __slots__ = ("_sk", "peer_id", "public_key")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        self._sk = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._sk.verify_key)
        self.peer_id: bytes = peer_id_from_ed25519(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return bytes(self._sk.sign(data).signature)


def sign_message(identity: Ed25519Identity, msg: Message) -> Message:
    """Return ``msg`` authored and signed by ``identity`` (key inlined in the peer id)."""
    body = Message(from_peer=identity.peer_id, data=msg.data, seqno=msg.seqno, topic=msg.topic)
    body.signature = identity.sign(SIGN_PREFIX + encode_message(body))
    return body


def verify_message(msg: Message) -> None:
    """Check StrictSign: author, sequence number and a valid signature are all present."""
    if msg.signature is None:
        raise MissingSignatureError("message has no signature")
    if msg.from_peer is None or msg.seqno is None:
        raise InvalidSignatureError("signed message lacks from or seqno")
    if msg.key is not None:
        raw = _unmarshal_public_key(msg.key)
        if peer_id_from_ed25519(raw) != msg.from_peer:
            raise InvalidSignatureError("key field does not match the author peer id")
    else:
        raw = public_key_from_peer_id(msg.from_peer)
    unsigned = Message(from_peer=msg.from_peer, data=msg.data, seqno=msg.seqno, topic=msg.topic)
    try:
        nacl.signing.VerifyKey(raw).verify(SIGN_PREFIX + encode_message(unsigned), msg.signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise InvalidSignatureError("signature does not verify") from exc
