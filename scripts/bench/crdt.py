"""CRDT bookkeeping cost: meshmerge MergeState vs crdt-merge 0.11.0's CRDTMergeState.

Measures, at growing state sizes, the median cost of one operation:
- add: a contribution with a 64-tensor manifest. For meshmerge three figures:
  the OR-Set bookkeeping alone (already verified), the full remote path
  (signature check + schema check + bookkeeping) and the same from wire bytes
  (decode + verify + bookkeep). crdt-merge: `add()` of a 64-element tensor with
  an explicit id (it signs and checks nothing).
- delta join: merging a one-contribution state into the big one
  (crdt-merge: `merge()` of a one-element state, which re-sorts everything).
- full join of two 1000-element states (half overlapping).
- root computation (meshmerge: RFC 6962 Merkle root over live ids, recomputed
  from scratch, and brought up to date after one add; crdt-merge: `state_hash()`
  from scratch).

Run: scripts/bench/run crdt   (or .venv/bin/python scripts/bench/crdt.py --sizes 1000,10000)
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fixtures
from _table import machine, table

from meshmerge.crdt import MergeState, reconcile
from meshmerge.crdt.merkle import merkle_root, root_of_leaves
from meshmerge.proto import messages
from meshmerge.proto.cbor import encode
from meshmerge.proto.messages import (
    ITEMSIZE,
    MAX_DIM,
    MAX_DIMS,
    SetSchema,
    SignedHeader,
    StateMessage,
    TensorEntry,
    loads_state,
)

TENSORS = 64
TENSOR_NAME = re.compile(r"[\x21-\x7e]{1,512}")
cython_entries = messages._fast_entries
SAMPLES = 200
ROOT_SAMPLES = 50


def make_schema() -> SetSchema:
    return _fixtures.make_schema("bench/set", TENSORS)


def make_headers(schema: SetSchema, n: int, authors: int = 50) -> list[SignedHeader]:
    return _fixtures.make_headers(schema, n, authors, key_prefix=b"bench")


def median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def python_entries(raw: list[Any], with_digest: bool) -> tuple[TensorEntry, ...] | None:
    """The manifest fast path as it was in Python before cext/manifest.pyx (commit 33b56ec)."""
    out = []
    keys = frozenset({"name", "dtype", "shape", "size", "sha256"})
    for i, obj in enumerate(raw):
        _path = f"$.h.tensors[{i}]"  # the old code formatted each entry's path up front
        if type(obj) is not dict or obj.keys() != keys:
            return None
        name, dtype, shape = obj["name"], obj["dtype"], obj["shape"]
        if type(name) is not str or not TENSOR_NAME.fullmatch(name) or type(dtype) is not str:
            return None
        if dtype not in ITEMSIZE or type(shape) is not list or len(shape) > MAX_DIMS:
            return None
        numel = 1
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                return None
            numel *= d
        size, digest = obj["size"], obj["sha256"]
        if type(size) is not int or size != numel * ITEMSIZE[dtype] or type(digest) is not bytes:
            return None
        if len(digest) != 32:
            return None
        out.append(TensorEntry(name, dtype, tuple(shape), size, digest))
    if any(a.name >= b.name for a, b in itertools.pairwise(out)):
        return None
    return tuple(out)


def ours(sizes: list[int], headers: list[SignedHeader], schema: SetSchema) -> dict[str, dict[int, float]]:
    res: dict[str, dict[int, float]] = {"add (bookkeeping)": {}, "delta join (verify+bookkeep)": {}}
    res["delta join (from wire)"] = {}
    res["delta join (duplicate)"] = {}
    res["delta join (from wire), manifest rules in Python (before)"] = {}
    res["root (full recompute)"] = {}
    res["root after one add"] = {}
    res["root after one add, rehash all cached leaves (before)"] = {}
    for n in sizes:
        state = MergeState(schema)
        for h in headers[:n]:
            state.orset.add(h)
        roots, fresh, rehash = [], [], []
        for _ in range(5):
            t0 = time.perf_counter()
            merkle_root(state.live_ids())
            roots.append(time.perf_counter() - t0)
        extra = headers[n : n + 3 * SAMPLES]
        state.root()
        tree = state.orset._tree
        for h in extra[:ROOT_SAMPLES]:  # a new id lands at a uniformly random sorted position
            state.orset.add(h)
            t0 = time.perf_counter()
            root = state.root()
            fresh.append(time.perf_counter() - t0)
            # the previous code: rebuild the whole tree from the cached leaf hashes
            t0 = time.perf_counter()
            before = root_of_leaves(tree._levels[0])
            rehash.append(time.perf_counter() - t0)
            assert before == root
        book, full, wire, py_wire, delta = [], [], [], [], []
        for h in extra[ROOT_SAMPLES:SAMPLES]:
            t0 = time.perf_counter()
            state.orset.add(h)
            book.append(time.perf_counter() - t0)
        for h in extra[SAMPLES : 2 * SAMPLES]:
            msg = StateMessage(schema.id, adds=(h,))
            t0 = time.perf_counter()
            state.apply(msg)
            full.append(time.perf_counter() - t0)
        for i, h in enumerate(extra[2 * SAMPLES :]):  # alternate Cython and the old Python rules
            raw = encode(StateMessage(schema.id, adds=(h,)).to_obj())
            python = i % 2 == 1
            if python:
                messages._fast_entries = python_entries
            try:
                t0 = time.perf_counter()
                state.apply(loads_state(raw))
                (py_wire if python else wire).append(time.perf_counter() - t0)
            finally:
                messages._fast_entries = cython_entries
        # delta join of an already-present op (the common gossip duplicate) and root
        for h in extra[:SAMPLES]:
            msg = StateMessage(schema.id, adds=(h,))
            t0 = time.perf_counter()
            state.apply(msg)
            delta.append(time.perf_counter() - t0)
        res["add (bookkeeping)"][n] = median_us(book)
        res["delta join (verify+bookkeep)"][n] = median_us(full)
        res["delta join (from wire)"][n] = median_us(wire)
        res["delta join (from wire), manifest rules in Python (before)"][n] = median_us(py_wire)
        res["delta join (duplicate)"][n] = median_us(delta)
        res["root (full recompute)"][n] = median_us(roots)
        res["root after one add"][n] = median_us(fresh)
        res["root after one add, rehash all cached leaves (before)"][n] = median_us(rehash)
    return res


def full_join_ours(headers: list[SignedHeader], schema: SetSchema) -> float:
    a, b = MergeState(schema), MergeState(schema)
    for h in headers[:1000]:
        a.orset.add(h)
    for h in headers[500:1500]:
        b.orset.add(h)
    msg = b.full_state()
    times = []
    for _ in range(5):
        target = MergeState(schema)
        for h in headers[:1000]:
            target.orset.add(h)
        t0 = time.perf_counter()
        target.apply(msg)
        times.append(time.perf_counter() - t0)
    return median_us(times)


def theirs(sizes: list[int]) -> dict[str, dict[int, float]] | None:
    try:
        from crdt_merge.model.crdt_state import CRDTMergeState
    except ImportError:
        return None
    res: dict[str, dict[int, float]] = {"add": {}, "delta join": {}, "root": {}}
    tensor = np.ones(TENSORS, dtype=np.float32)
    for n in sizes:
        state = CRDTMergeState("weight_average")
        for i in range(n):
            state.add(tensor, model_id=f"m{i:08d}")
        adds, joins, roots = [], [], []
        for _ in range(5):
            state._invalidate_cache()
            t0 = time.perf_counter()
            _ = state.state_hash
            roots.append(time.perf_counter() - t0)
        for i in range(n, n + SAMPLES):
            t0 = time.perf_counter()
            state.add(tensor, model_id=f"m{i:08d}")
            adds.append(time.perf_counter() - t0)
        for i in range(n + SAMPLES, n + SAMPLES + min(SAMPLES, 50)):
            one = CRDTMergeState("weight_average")
            one.add(tensor, model_id=f"m{i:08d}")
            t0 = time.perf_counter()
            state.merge(one)
            joins.append(time.perf_counter() - t0)
        res["add"][n] = median_us(adds)
        res["delta join"][n] = median_us(joins)
        res["root"][n] = median_us(roots)
    return res


def full_join_theirs() -> float | None:
    try:
        from crdt_merge.model.crdt_state import CRDTMergeState
    except ImportError:
        return None
    tensor = np.ones(TENSORS, dtype=np.float32)
    b = CRDTMergeState("weight_average")
    for i in range(500, 1500):
        b.add(tensor, model_id=f"m{i:08d}")
    times = []
    for _ in range(5):
        a = CRDTMergeState("weight_average")
        for i in range(1000):
            a.add(tensor, model_id=f"m{i:08d}")
        t0 = time.perf_counter()
        a.merge(b)
        times.append(time.perf_counter() - t0)
    return median_us(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000,10000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    schema = make_schema()
    print(f"generating {max(sizes) + 3 * SAMPLES + 1500} signed 64-tensor headers…", file=sys.stderr)
    headers = make_headers(schema, max(max(sizes), 1500) + 3 * SAMPLES)
    mine = ours(sizes, headers, schema)
    other = theirs(sizes)
    print(f"# CRDT bookkeeping: median µs per operation ({machine()})\n")
    rows = []
    pairs = [
        ("add (bookkeeping)", "add"),
        ("delta join (verify+bookkeep)", "delta join"),
        ("delta join (from wire)", None),
        ("delta join (from wire), manifest rules in Python (before)", None),
        ("delta join (duplicate)", None),
        ("root (full recompute)", "root"),
        ("root after one add", None),
        ("root after one add, rehash all cached leaves (before)", None),
    ]
    for n in sizes:
        for ours_key, their_key in pairs:
            o = mine[ours_key][n]
            t = other[their_key][n] if other and their_key else None
            ratio = f"{t / o:.1f}x" if t else "—"
            rows.append([n, ours_key, o, t if t is not None else "—", ratio])
    fo, ft = full_join_ours(headers, schema), full_join_theirs()
    rows.append(
        [1000, "full join 1000 ⊔ 1000 (500 overlap)", fo, ft if ft else "—", f"{ft / fo:.1f}x" if ft else "—"]
    )
    print(
        table(
            [
                "live contributions",
                "operation",
                "meshmerge µs",
                "crdt-merge 0.11.0 µs",
                "crdt-merge / meshmerge",
            ],
            rows,
        )
    )
    print(
        "\nA delta join is one new contribution arriving from a peer: meshmerge checks its Ed25519 "
        "signature and the schema ('from wire' adds canonical-CBOR decoding); crdt-merge merges a "
        "one-element state and checks nothing. 'duplicate' is a re-delivery of a known op."
    )
    print("\n# Anti-entropy repair of one missing contribution: full state vs bucket digests\n")
    print(
        table(
            [
                "live contributions",
                "bits",
                "full state bytes",
                "digest repair bytes",
                "full ÷ digest",
                "digest repair ms (both sides)",
            ],
            repair_rows(sizes, headers, schema),
        )
    )
    print(
        "\nBytes are the CBOR frames a 1.0.0 pull ('state') and a 1.1.0 repair ('digests' answer + "
        "'ops' answer) put on the wire; time is computing both sides' digests, the difference, "
        "the bucket's ops and applying them (signature checked), no network."
    )


def repair_rows(sizes: list[int], headers: list[SignedHeader], schema: SetSchema) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for n in sizes:
        full, behind = MergeState(schema), MergeState(schema)
        for h in headers[:n]:
            full.orset.add(h)
        for h in headers[: n - 1]:
            behind.orset.add(h)
        full_bytes = len(encode({"state": encode(full.full_state().to_obj())}))
        bits = reconcile.choose_bits(reconcile.op_count(behind))
        t0 = time.perf_counter()
        theirs = reconcile.digests(full, bits)
        wanted = reconcile.differing(reconcile.digests(behind, bits), theirs)
        delta = reconcile.ops_in(full, wanted, bits)
        behind.apply(delta)
        took = time.perf_counter() - t0
        assert behind.root() == full.root() and len(wanted) == 1
        answer = {"bits": bits, "buckets": [[i, d, c] for i, (d, c) in sorted(theirs.items())]}
        repair_bytes = len(encode(answer)) + len(encode({"state": encode(delta.to_obj())}))
        rows.append([n, bits, full_bytes, repair_bytes, f"{full_bytes / repair_bytes:.0f}x", took * 1e3])
    return rows


if __name__ == "__main__":
    main()
