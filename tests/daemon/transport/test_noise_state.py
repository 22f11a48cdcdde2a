"""Noise XX core: agrees with an independent implementation, rejects tampering."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from noise.connection import Keypair, NoiseConnection

from meshmerge.daemon.transport.noise import (
    SIGNATURE_PREFIX,
    NoiseProtocolError,
    _verify_payload,
    decode_payload,
    encode_payload,
)
from meshmerge.daemon.transport.noise_state import (
    MAX_PLAINTEXT,
    Handshake,
    NoiseError,
    public_bytes,
)


def _pair() -> tuple[Handshake, Handshake, bytes, bytes]:
    i = Handshake(True, X25519PrivateKey.generate())
    r = Handshake(False, X25519PrivateKey.generate())
    assert r.read_message(i.write_message(b"")) == b""
    assert i.read_message(r.write_message(b"responder payload")) == b"responder payload"
    assert r.read_message(i.write_message(b"initiator payload")) == b"initiator payload"
    return i, r, public_bytes(i.s), public_bytes(r.s)


def test_handshake_learns_static_keys_and_split_ciphers_match() -> None:
    i, r, i_pub, r_pub = _pair()
    assert i.rs == r_pub and r.rs == i_pub
    assert i.h == r.h  # same transcript hash
    i_send, i_recv = i.split()
    r_send, r_recv = r.split()
    for n in range(3):
        assert r_recv.decrypt(b"", i_send.encrypt(b"", b"ping %d" % n)) == b"ping %d" % n
        assert i_recv.decrypt(b"", r_send.encrypt(b"", b"pong %d" % n)) == b"pong %d" % n


def _reference(initiator: bool, static: X25519PrivateKey) -> NoiseConnection:
    conn = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.private_bytes_raw())
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    conn.start_handshake()
    return conn


@pytest.mark.parametrize("we_initiate", [True, False])
def test_interoperates_with_the_noiseprotocol_package(we_initiate: bool) -> None:
    """`noiseprotocol` (a dependency of py-libp2p) is an independent implementation of the spec."""
    ours = Handshake(we_initiate, X25519PrivateKey.generate())
    theirs = _reference(not we_initiate, X25519PrivateKey.generate())
    if we_initiate:
        theirs.read_message(ours.write_message(b""))
        assert ours.read_message(theirs.write_message(b"r")) == b"r"
        assert theirs.read_message(ours.write_message(b"i")) == b"i"
    else:
        ours.read_message(theirs.write_message(b""))
        assert theirs.read_message(ours.write_message(b"r")) == b"r"
        assert ours.read_message(theirs.write_message(b"i")) == b"i"
    assert theirs.handshake_finished
    send, recv = ours.split()
    assert theirs.decrypt(send.encrypt(b"", b"x" * 1000)) == b"x" * 1000
    assert recv.decrypt(b"", theirs.encrypt(b"y" * MAX_PLAINTEXT)) == b"y" * MAX_PLAINTEXT


def test_tampered_or_truncated_messages_are_refused() -> None:
    i, r, _, _ = _pair()
    send, _ = i.split()
    _, recv = r.split()
    ct = bytearray(send.encrypt(b"", b"hello"))
    ct[3] ^= 1
    with pytest.raises(NoiseError, match="tag"):
        recv.decrypt(b"", bytes(ct))
    with pytest.raises(NoiseError, match="shorter than the tag"):
        recv.decrypt(b"", b"short")

    a = Handshake(True, X25519PrivateKey.generate())
    b = Handshake(False, X25519PrivateKey.generate())
    b.read_message(a.write_message(b""))
    m2 = bytearray(b.write_message(b"payload"))
    m2[40] ^= 0xFF  # inside the encrypted static key
    with pytest.raises(NoiseError):
        a.read_message(bytes(m2))
    c = Handshake(True, X25519PrivateKey.generate())
    c.write_message(b"")
    with pytest.raises(NoiseError, match="too short"):
        c.read_message(b"\x00" * 40)


def test_messages_out_of_order_are_refused() -> None:
    r = Handshake(False, X25519PrivateKey.generate())
    with pytest.raises(NoiseError, match="no message to write"):
        r.write_message(b"")
    with pytest.raises(NoiseError, match="not finished"):
        r.split()


def test_identity_payload_roundtrip_and_signature_check() -> None:
    kp = create_new_key_pair()
    static = public_bytes(X25519PrivateKey.generate())
    payload = encode_payload(kp.public_key.serialize(), kp.private_key.sign(SIGNATURE_PREFIX + static))
    key, peer = _verify_payload(payload, static)
    assert key.to_bytes() == kp.public_key.to_bytes()
    assert peer == ID.from_pubkey(kp.public_key)
    other_static = public_bytes(X25519PrivateKey.generate())
    with pytest.raises(NoiseProtocolError, match="signature"):
        _verify_payload(payload, other_static)  # signed a different static key
    # unknown fields (e.g. extensions, field 4) are skipped
    assert decode_payload(payload + b"\x22\x02\x0a\x00")[0] == kp.public_key.serialize()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_payload_decoder_never_crashes(data: bytes) -> None:
    try:
        key, sig = decode_payload(data)
    except NoiseProtocolError:
        return
    assert isinstance(key, bytes) and isinstance(sig, bytes)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_handshake_garbage_gives_noise_error(data: bytes) -> None:
    r = Handshake(False, X25519PrivateKey.generate())
    r.read_message(Handshake(True, X25519PrivateKey.generate()).write_message(b""))
    r.write_message(b"p")
    with pytest.raises(NoiseError):
        r.read_message(data)  # message 3 must authenticate
