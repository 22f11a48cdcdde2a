"""Kademlia key space: 256-bit SHA-256 ids, XOR distance, common prefix length."""

from __future__ import annotations

import hashlib


def kad_id(raw: bytes) -> int:
    """Position in the key space of a peer id (its bytes) or a record/provider key."""
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def common_prefix_len(a: int, b: int) -> int:
    """Number of leading bits `a` and `b` share (256 when equal)."""
    return 256 - (a ^ b).bit_length()


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated or oversized varint")


def provider_key(cid_or_multihash: bytes) -> bytes:
    """The DHT key for provider records: the multihash inside a CID.

    go/js key provider records by multihash, so a CIDv1 (version, codec,
    multihash) is stripped to its multihash; a CIDv0 / bare multihash passes.
    """
    if not cid_or_multihash:
        raise ValueError("empty CID")
    if cid_or_multihash[0] == 0x01:
        _, pos = _uvarint(cid_or_multihash, 0)
        _, pos = _uvarint(cid_or_multihash, pos)
        mh = cid_or_multihash[pos:]
    else:
        mh = cid_or_multihash
    code, pos = _uvarint(mh, 0)
    length, pos = _uvarint(mh, pos)
    if len(mh) - pos != length or length == 0:
        raise ValueError(
            f"malformed multihash (code {code:#x}, declared {length} bytes, has {len(mh) - pos})"
        )
    return mh
