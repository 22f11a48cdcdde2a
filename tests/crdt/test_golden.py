"""Golden vectors: fixed keys and tensors → committed CIDs, roots and merged digests.

Any change to encoding, hashing, ordering or the linear kernel shows up here.
Regenerate deliberately with: .venv/bin/python -m tests.crdt.test_golden --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from meshmerge.crdt import MergeState, digest_of_tensors
from meshmerge.proto import cid
from meshmerge.proto.cbor import encode
from tests.crdt.factories import schema, signer, tensors

GOLDEN = Path(__file__).parent.parent / "golden" / "crdt.json"


def compute() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dtype in ("F32", "F16", "BF16"):
        s = MergeState(schema(dtype=dtype))
        blobs = {}
        ids = []
        for k in range(4):
            t = {n: _as(a, dtype) for n, a in tensors(k).items()}
            h = s.contribute(signer(k), t, weight=k + 1, meta={"k": k})
            blobs[h.id] = t
            ids.append(cid.to_text(h.id))
        out[dtype] = {
            "set_id": cid.to_text(s.set_id),
            "contributions": ids,
            "root": s.root().hex(),
            "state_sha256": hashlib.sha256(encode(s.full_state().to_obj())).hexdigest(),
            "merged_linear": digest_of_tensors(s.merged(blobs.get)),
        }
    return out


def _as(a: Any, dtype: str) -> Any:
    import numpy as np

    if dtype == "F16":
        return a.astype(np.float16)
    if dtype == "BF16":
        return (a.view(np.uint32) >> 16).astype(np.uint16)
    return a


def test_golden_vectors() -> None:
    assert compute() == json.loads(GOLDEN.read_text())


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(compute(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
