"""Kademlia key space: 256-bit SHA-256 ids, XOR distance, common prefix length."""

from __future__ import annotations

import hashlib

from meshmerge.proto.varint import read_uvarint


def kad_id(raw: bytes) -> int:
    """Position in the key space of a peer id (its bytes) or a record/provider key."""
    return int.from_bytes(hashlib.sha256(raw).digest(), "big")


def distance(a: int, b: int) -> int:
    return a ^ b


def common_prefix_len(a: int, b: int) -> int:
    """Number of leading bits `a` and `b` share (256 when equal)."""
    return 256 - (a ^ b).bit_length()


def provider_key(cid_or_multihash: bytes) -> bytes:
    """The DHT key for provider records: the multihash inside a CID.

    go/js key provider records by multihash, so a CIDv1 (version, codec,
    multihash) is stripped to its multihash; a CIDv0 / bare multihash passes.
    """
    if not cid_or_multihash:
        raise ValueError("empty CID")
    if cid_or_multihash[0] == 0x01:
        _, pos = read_uvarint(cid_or_multihash, 0)
        _, pos = read_uvarint(cid_or_multihash, pos)
        mh = cid_or_multihash[pos:]
    else:
        mh = cid_or_multihash
    code, pos = read_uvarint(mh, 0)
    length, pos = read_uvarint(mh, pos)
    if len(mh) - pos != length or length == 0:
        raise ValueError(
            f"malformed multihash (code {code:#x}, declared {length} bytes, has {len(mh) - pos})"
        )
    return mh
