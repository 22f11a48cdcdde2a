"""Signed contribution headers for benchmarks (signing is slow, so build them once)."""

from __future__ import annotations

import hashlib

from meshmerge.crdt import Signer
from meshmerge.crdt.signing import DOMAIN_HEADER
from meshmerge.proto.messages import ContributionHeader, SetSchema, SignedHeader, TensorEntry


def make_schema(name: str, tensors: int) -> SetSchema:
    return SetSchema(name, "weights", tuple(TensorEntry(f"t{i:02d}", "F32", (8, 8)) for i in range(tensors)))


def make_headers(
    schema: SetSchema, n: int, authors: int = 50, key_prefix: bytes = b"bench"
) -> list[SignedHeader]:
    """n headers round-robin over `authors` deterministic keys, with distinct fake digests."""
    signers = [Signer(hashlib.sha256(key_prefix + b"-%d" % a).digest()) for a in range(authors)]
    out = []
    for i in range(n):
        signer = signers[i % authors]
        entries = tuple(
            TensorEntry(
                t.name, t.dtype, t.shape, 256, hashlib.sha256(b"%d/%s" % (i, t.name.encode())).digest()
            )
            for t in schema.tensors
        )
        header = ContributionHeader(schema.id, signer.peer_id, i // authors, 1, "weights", entries)
        out.append(SignedHeader(header, signer.sign(DOMAIN_HEADER, header.encoded)))
    return out
