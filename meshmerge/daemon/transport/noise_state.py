"""Noise_XX_25519_ChaChaPoly_SHA256 as libp2p uses it: handshake and transport ciphers, no I/O.

Theory of operation (Noise spec rev. 34, libp2p noise spec):

* The handshake is three messages, ``-> e``, ``<- e, ee, s, es``, ``-> s, se``.
  `Handshake` holds the symmetric state (chaining key ``ck``, handshake hash ``h``,
  the current key) and the four key pairs; `write_message` / `read_message` take and
  return whole handshake messages (without the 2-byte length prefix, which is
  framing, not Noise). libp2p's identity payload rides in messages 2 and 3.
* After message 3 both sides `split()` into two `CipherState`s, one per direction.
  A transport message is ``ENCRYPT(k, n, ad="", plaintext)`` with a 64-bit counter
  nonce, at most 65535 bytes including the 16-byte tag.
* Crypto: X25519 and SHA-256/HMAC from the standard library and `cryptography`
  (one AEAD object per direction, so a frame costs one C call).

Errors are `NoiseError` with the reason; a failed decrypt is fatal for the session.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PROTOCOL_NAME = b"Noise_XX_25519_ChaChaPoly_SHA256"
DHLEN = 32
TAGLEN = 16
MAX_MESSAGE = 65535
"""Largest Noise message (ciphertext incl. tag); the libp2p frame length is 2 bytes."""
MAX_PLAINTEXT = MAX_MESSAGE - TAGLEN
MAX_NONCE = 2**64 - 1
_NONCE = struct.Struct("<4xQ")


class NoiseError(Exception):
    """The peer broke the Noise protocol (bad length, tag, key or order)."""


def _hkdf2(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    temp = hmac.digest(ck, ikm, "sha256")
    out1 = hmac.digest(temp, b"\x01", "sha256")
    out2 = hmac.digest(temp, out1 + b"\x02", "sha256")
    return out1, out2


class CipherState:
    """One direction of a Noise session: key + counter nonce."""

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def encrypt(self, ad: bytes, plaintext: bytes | bytearray | memoryview) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted; the session must end")
        out = self._aead.encrypt(_NONCE.pack(self.n), plaintext, ad or None)
        self.n += 1
        return out

    def decrypt(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if self.n >= MAX_NONCE:
            raise NoiseError("nonce space exhausted; the session must end")
        if len(ciphertext) < TAGLEN:
            raise NoiseError(f"ciphertext of {len(ciphertext)} bytes is shorter than the tag")
        try:
            out = self._aead.decrypt(_NONCE.pack(self.n), ciphertext, ad or None)
        except InvalidTag:
            raise NoiseError("authentication tag mismatch (corrupted or forged message)") from None
        self.n += 1
        return out


def generate_static() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _dh(priv: X25519PrivateKey, pub: bytes) -> bytes:
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise NoiseError(f"invalid X25519 public key from peer ({exc})") from None
    return shared


class Handshake:
    """XX handshake state for one side. Call the methods in protocol order:

    initiator: write_message(b"") -> read_message(m2) -> write_message(payload) -> split()
    responder: read_message(m1) -> write_message(payload) -> read_message(m3) -> split()
    """

    def __init__(self, initiator: bool, static: X25519PrivateKey, prologue: bytes = b"") -> None:
        self.initiator = initiator
        self.s = static
        self.e: X25519PrivateKey | None = None
        self.re: bytes | None = None
        self.rs: bytes | None = None
        self.h = PROTOCOL_NAME  # exactly HASHLEN bytes, used as-is per the spec
        self.ck = self.h
        self.cipher = CipherState()
        self.step = 0
        self._mix_hash(prologue)

    # symmetric state ------------------------------------------------------------------
    def _mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def _mix_key(self, ikm: bytes) -> None:
        self.ck, key = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(key)

    def _encrypt_and_hash(self, plaintext: bytes) -> bytes:
        out = self.cipher.encrypt(self.h, plaintext)
        self._mix_hash(out)
        return out

    def _decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        out = self.cipher.decrypt(self.h, ciphertext)
        self._mix_hash(ciphertext)
        return out

    def _new_ephemeral(self) -> bytes:
        self.e = X25519PrivateKey.generate()
        pub = public_bytes(self.e)
        self._mix_hash(pub)
        return pub

    # messages ---------------------------------------------------------------------------
    def write_message(self, payload: bytes) -> bytes:
        step, self.step = self.step, self.step + 1
        if self.initiator and step == 0:  # -> e
            return self._new_ephemeral() + self._encrypt_and_hash(payload)
        if not self.initiator and step == 1:  # <- e, ee, s, es
            assert self.re is not None
            out = self._new_ephemeral()
            assert self.e is not None
            self._mix_key(_dh(self.e, self.re))
            out += self._encrypt_and_hash(public_bytes(self.s))
            self._mix_key(_dh(self.s, self.re))
            return out + self._encrypt_and_hash(payload)
        if self.initiator and step == 2:  # -> s, se
            assert self.re is not None
            out = self._encrypt_and_hash(public_bytes(self.s))
            self._mix_key(_dh(self.s, self.re))
            return out + self._encrypt_and_hash(payload)
        raise NoiseError(f"handshake: no message to write at step {step}")

    def read_message(self, message: bytes) -> bytes:
        step, self.step = self.step, self.step + 1
        if len(message) > MAX_MESSAGE:
            raise NoiseError(f"handshake message of {len(message)} bytes exceeds {MAX_MESSAGE}")
        if not self.initiator and step == 0:  # -> e
            if len(message) < DHLEN:
                raise NoiseError("handshake message 1 is shorter than an ephemeral key")
            self.re = bytes(message[:DHLEN])
            self._mix_hash(self.re)
            return self._decrypt_and_hash(bytes(message[DHLEN:]))
        if self.initiator and step == 1:  # <- e, ee, s, es
            if len(message) < DHLEN + DHLEN + TAGLEN + TAGLEN:
                raise NoiseError("handshake message 2 is too short")
            assert self.e is not None
            self.re = bytes(message[:DHLEN])
            self._mix_hash(self.re)
            self._mix_key(_dh(self.e, self.re))
            self.rs = self._decrypt_and_hash(bytes(message[DHLEN : 2 * DHLEN + TAGLEN]))
            self._mix_key(_dh(self.e, self.rs))
            return self._decrypt_and_hash(bytes(message[2 * DHLEN + TAGLEN :]))
        if not self.initiator and step == 2:  # -> s, se
            if len(message) < DHLEN + TAGLEN + TAGLEN:
                raise NoiseError("handshake message 3 is too short")
            assert self.e is not None
            self.rs = self._decrypt_and_hash(bytes(message[: DHLEN + TAGLEN]))
            self._mix_key(_dh(self.e, self.rs))
            return self._decrypt_and_hash(bytes(message[DHLEN + TAGLEN :]))
        raise NoiseError(f"handshake: no message to read at step {step}")

    @property
    def finished(self) -> bool:
        return self.step >= 3

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) ciphers for this side; only after the third message."""
        if not self.finished:
            raise NoiseError("handshake not finished")
        k1, k2 = _hkdf2(self.ck, b"")
        c1, c2 = CipherState(k1), CipherState(k2)
        return (c1, c2) if self.initiator else (c2, c1)

