"""CIDv1 content ids (dag-cbor codec, sha2-256 multihash).

Contribution ids are CIDs so DHT provider records use standard multihash
keys that go- and js-libp2p peers understand. Our headers contain only
integers, strings, byte strings, booleans, arrays and maps, so their
canonical CBOR is also valid dag-cbor.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final

CID_VERSION: Final = 0x01
DAG_CBOR: Final = 0x71
SHA2_256: Final = 0x12
PREFIX: Final = bytes([CID_VERSION, DAG_CBOR, SHA2_256, 32])
CID_LEN: Final = len(PREFIX) + 32


class CidError(ValueError):
    pass


def cid_of(canonical_cbor: bytes) -> bytes:
    """Binary CIDv1 of a canonical dag-cbor block."""
    return PREFIX + hashlib.sha256(canonical_cbor).digest()


def check_cid(cid: bytes) -> bytes:
    """Return cid if it is a dag-cbor/sha2-256 CIDv1, else raise CidError."""
    if len(cid) != CID_LEN or not cid.startswith(PREFIX):
        raise CidError(f"not a dag-cbor sha2-256 CIDv1: {cid[:8].hex()}… ({len(cid)} bytes)")
    return cid


def multihash(cid: bytes) -> bytes:
    """The multihash part of a CID: the key a DHT provider record uses."""
    return check_cid(cid)[2:]


def to_text(cid: bytes) -> str:
    """Multibase base32 (lower case, no padding) text form, as IPFS prints CIDv1."""
    return "b" + base64.b32encode(check_cid(cid)).decode().lower().rstrip("=")


def from_text(text: str) -> bytes:
    if not text.startswith("b"):
        raise CidError(f"expected a base32 CIDv1 starting with 'b': {text[:16]!r}")
    body = text[1:].upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise CidError(f"invalid base32 in CID {text[:16]!r}") from None
    return check_cid(raw)
