"""Record validation and selection: which values the DHT stores and which one wins.

Every PUT and every value seen during a GET goes through `NamespacedValidator`:
keys must be ``/<namespace>/...`` with a registered namespace, and the value must
pass that namespace's validator. Anything else is a `RecordRejected` naming the
rule — there is no "accept anything" mode.

The ``/meshmerge/`` namespace holds *signed, self-certifying* records:

    key   = b"/meshmerge/" + hex(author Ed25519 public key) + b"/" + name
    value = b"MMR1" | seq (u64 big-endian) | signature (64) | payload
    signed message = b"meshmerge/dht-record/v1\\0" | u16 len(key) | key | seq | payload

Only the holder of the key named in the record key can produce a valid value, so
no one can overwrite another author's record. The selector prefers the highest
`seq`, then the greater value bytes, so every node picks the same winner.

The ``/pk/`` namespace is the libp2p public-key record that go- and js-libp2p
validate too (key = b"/pk/" + peer id bytes, value = the protobuf PublicKey):
self-certifying, since the peer id is the key's identity or sha256 multihash.
It is what lets put/get interoperate with go-libp2p, whose DHT stores only
``/pk/`` and ``/ipns/`` values.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from libp2p.crypto.serialization import deserialize_public_key
from libp2p.peer.id import ID

from ..identity import verify

NAMESPACE = b"meshmerge"
MAGIC = b"MMR1"
SIGN_DOMAIN = b"meshmerge/dht-record/v1\x00"
HEADER = len(MAGIC) + 8 + 64
_NAME = re.compile(rb"[A-Za-z0-9._\-/]{1,128}")


class RecordRejected(ValueError):
    """A record key or value broke a rule; the message says which."""


class Validator(Protocol):
    def validate(self, key: bytes, value: bytes) -> None:
        """Raise `RecordRejected` unless `value` is acceptable under `key`."""

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Index of the best of several valid values (deterministic)."""


def split_namespace(key: bytes) -> bytes:
    if not key.startswith(b"/"):
        raise RecordRejected("key must start with '/'")
    ns, sep, _rest = key[1:].partition(b"/")
    if not sep or not ns:
        raise RecordRejected("key must be /<namespace>/<...>")
    return ns


class NamespacedValidator:
    """Dispatch to one validator per namespace; unknown namespaces are rejected."""

    def __init__(
        self, validators: dict[bytes, Validator], *, max_key_bytes: int, max_value_bytes: int
    ) -> None:
        self.validators = dict(validators)
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes

    def _for(self, key: bytes) -> Validator:
        if len(key) > self.max_key_bytes:
            raise RecordRejected(f"key is {len(key)} bytes; limit max_key_bytes={self.max_key_bytes}")
        ns = split_namespace(key)
        validator = self.validators.get(ns)
        if validator is None:
            raise RecordRejected(f"namespace {ns[:32]!r} has no validator")
        return validator

    def validate(self, key: bytes, value: bytes) -> None:
        validator = self._for(key)
        if len(value) > self.max_value_bytes:
            raise RecordRejected(f"value is {len(value)} bytes; limit max_value_bytes={self.max_value_bytes}")
        validator.validate(key, value)

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        if not values:
            raise RecordRejected("no values to select from")
        return self._for(key).select(key, values)


def meshmerge_key(public_key: bytes, name: bytes) -> bytes:
    if len(public_key) != 32:
        raise RecordRejected("author public key must be 32 bytes")
    if not _NAME.fullmatch(name):
        raise RecordRejected("record name must be 1-128 bytes of [A-Za-z0-9._-/]")
    return b"/" + NAMESPACE + b"/" + public_key.hex().encode() + b"/" + name


def _signed_message(key: bytes, seq: int, payload: bytes) -> bytes:
    return SIGN_DOMAIN + struct.pack(">H", len(key)) + key + struct.pack(">Q", seq) + payload


@dataclass(frozen=True)
class SignedRecord:
    """A parsed ``/meshmerge/`` value."""

    seq: int
    signature: bytes
    payload: bytes

    @classmethod
    def create(cls, key: bytes, seq: int, payload: bytes, sign: Callable[[bytes], bytes]) -> bytes:
        """Encode and sign; `sign` is `Identity.sign` of the author named in `key`."""
        if not 0 <= seq < 2**64:
            raise RecordRejected("seq must fit in 64 bits")
        sig = sign(_signed_message(key, seq, payload))
        return MAGIC + struct.pack(">Q", seq) + sig + payload

    @classmethod
    def parse(cls, value: bytes) -> SignedRecord:
        if len(value) < HEADER or value[:4] != MAGIC:
            raise RecordRejected("value is not a meshmerge signed record (bad magic or too short)")
        (seq,) = struct.unpack(">Q", value[4:12])
        return cls(seq, value[12:HEADER], value[HEADER:])


class MeshmergeRecordValidator:
    """Validator + selector for ``/meshmerge/<author-hex>/<name>`` signed records."""

    def author_of(self, key: bytes) -> bytes:
        parts = key.split(b"/", 3)
        if len(parts) != 4 or parts[0] != b"" or parts[1] != NAMESPACE:
            raise RecordRejected("key must be /meshmerge/<author-hex>/<name>")
        author_hex, name = parts[2], parts[3]
        if len(author_hex) != 64 or not re.fullmatch(rb"[0-9a-f]{64}", author_hex):
            raise RecordRejected("author must be 64 lowercase hex digits (Ed25519 public key)")
        if not _NAME.fullmatch(name):
            raise RecordRejected("record name must be 1-128 bytes of [A-Za-z0-9._-/]")
        return bytes.fromhex(author_hex.decode())

    def validate(self, key: bytes, value: bytes) -> None:
        author = self.author_of(key)
        record = SignedRecord.parse(value)
        if not verify(author, _signed_message(key, record.seq, record.payload), record.signature):
            raise RecordRejected("signature does not verify against the author key in the record key")

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        def rank(i: int) -> tuple[int, bytes]:
            try:
                return (SignedRecord.parse(values[i]).seq, values[i])
            except RecordRejected:
                return (-1, b"")

        return max(range(len(values)), key=rank)


PK_NAMESPACE = b"pk"


def pk_key(peer_id: ID) -> bytes:
    return b"/" + PK_NAMESPACE + b"/" + peer_id.to_bytes()


class PublicKeyValidator:
    """Validator + selector for ``/pk/<peer id bytes>`` public-key records."""

    def validate(self, key: bytes, value: bytes) -> None:
        prefix = b"/" + PK_NAMESPACE + b"/"
        if not key.startswith(prefix) or len(key) == len(prefix):
            raise RecordRejected("key must be /pk/<peer id bytes>")
        try:
            public_key = deserialize_public_key(value)
            derived = ID.from_pubkey(public_key).to_bytes()
        except Exception as exc:  # the deserializers raise a zoo of types on garbage
            raise RecordRejected(f"value is not a libp2p public key: {type(exc).__name__}") from None
        if derived != key[len(prefix) :]:
            raise RecordRejected("public key does not hash to the peer id in the key")

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Every valid value for one key is the same key; take the first valid one."""
        for i, value in enumerate(values):
            try:
                self.validate(key, value)
            except RecordRejected:
                continue
            return i
        return 0
