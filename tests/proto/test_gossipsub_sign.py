"""StrictSign: libp2p key format, message ids, tamper detection, cross-check with py-libp2p."""

from __future__ import annotations

import pytest

from meshmerge.proto.gossipsub import RPC, Message, decode_rpc, encode_rpc
from meshmerge.proto.gossipsub_sign import (
    Ed25519Identity,
    InvalidSignatureError,
    MissingSignatureError,
    UnsupportedKeyError,
    message_id,
    peer_id_from_ed25519,
    public_key_from_peer_id,
    sign_message,
    verify_message,
)

SEED = bytes(range(32))


def test_peer_id_is_identity_multihash_of_protobuf_key() -> None:
    ident = Ed25519Identity(SEED)
    assert ident.peer_id == b"\x00\x24\x08\x01\x12\x20" + ident.public_key
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key
    with pytest.raises(UnsupportedKeyError):
        public_key_from_peer_id(b"\x12\x20" + b"\x00" * 32)  # sha256 multihash (e.g. RSA)


def test_peer_id_matches_py_libp2p() -> None:
    keys = pytest.importorskip("libp2p.crypto.ed25519")
    peer_id_mod = pytest.importorskip("libp2p.peer.id")
    kp = keys.create_new_key_pair(SEED)
    theirs = peer_id_mod.ID.from_pubkey(kp.public_key).to_bytes()
    assert theirs == peer_id_from_ed25519(kp.public_key.to_bytes())
    assert theirs == Ed25519Identity(SEED).peer_id


def test_sign_verify_and_tamper() -> None:
    ident = Ed25519Identity(SEED)
    msg = sign_message(ident, Message(data=b"x", seqno=(7).to_bytes(8, "big"), topic="t"))
    verify_message(msg)
    verify_message(decode_rpc(encode_rpc(RPC(publish=[msg]))).publish[0])
    assert message_id(msg) == ident.peer_id + (7).to_bytes(8, "big")
    for field, value in [("data", b"y"), ("topic", "u"), ("seqno", b"\x00" * 8)]:
        bad = Message(msg.from_peer, msg.data, msg.seqno, msg.topic, msg.signature)
        setattr(bad, field, value)
        with pytest.raises(InvalidSignatureError):
            verify_message(bad)
    other = Ed25519Identity(bytes(32))
    forged = Message(other.peer_id, msg.data, msg.seqno, msg.topic, msg.signature)
    with pytest.raises(InvalidSignatureError):
        verify_message(forged)
    with pytest.raises(InvalidSignatureError):
        verify_message(
            Message(
                msg.from_peer,
                msg.data,
                msg.seqno,
                msg.topic,
                msg.signature,
                key=b"\x08\x01\x12\x20" + other.public_key,
            )
        )
    with pytest.raises(MissingSignatureError):
        verify_message(Message(msg.from_peer, msg.data, msg.seqno, msg.topic))
    with pytest.raises(InvalidSignatureError):
        verify_message(Message(msg.from_peer, msg.data, msg.seqno, msg.topic, b"short"))
    with pytest.raises(UnsupportedKeyError):
        verify_message(Message(b"\x12\x20" + b"\x00" * 32, b"", b"1", "t", b"s" * 64))


def test_py_libp2p_accepts_our_signature() -> None:
    """An independent verifier (py-libp2p's signature_validator) accepts our signed bytes."""
    validators = pytest.importorskip("libp2p.pubsub.validators")
    rpc_pb2 = pytest.importorskip("libp2p.pubsub.pb.rpc_pb2")
    msg = sign_message(Ed25519Identity(SEED), Message(data=b"hello", seqno=(1).to_bytes(8, "big"), topic="t"))
    ref = rpc_pb2.RPC()
    ref.ParseFromString(encode_rpc(RPC(publish=[msg])))
    assert validators.signature_validator(ref.publish[0])
    ref.publish[0].data = b"hellO"
    assert not validators.signature_validator(ref.publish[0])
