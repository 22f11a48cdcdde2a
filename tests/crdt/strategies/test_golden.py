"""Golden vectors: fixed inputs -> committed sha256 of every strategy's output.

Inputs come from our own counter-based PRNG (not numpy's), so they are the
same on every platform. To regenerate after an intended change of a
strategy's definition: ``MESHMERGE_WRITE_GOLDEN=1 scripts/test tests/crdt/strategies/test_golden.py``
and explain the change in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.crdt.strategies.cases import RUNNABLE
from tests.crdt.strategies.helpers import make_input, run

GOLDEN = Path(__file__).with_name("golden.json")
DTYPES = ("F32", "F16", "BF16")
KINDS = ("weights", "delta")


def digest(name: str, dtype: str, kind: str) -> str:
    inp = make_input(5, dtype=dtype, kind=kind, tag="golden")
    out = run(name, inp, RUNNABLE[name])
    h = hashlib.sha256()
    for spec in inp.specs:
        h.update(spec.name.encode() + b"\0" + out[spec.name].tobytes())
    return h.hexdigest()


def current() -> dict[str, str]:
    return {
        f"{name}/{kind}/{dtype}": digest(name, dtype, kind)
        for name in sorted(RUNNABLE)
        for kind in KINDS
        for dtype in DTYPES
    }


def test_golden_vectors() -> None:
    got = current()
    if os.environ.get("MESHMERGE_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip("golden vectors rewritten")
    want = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in want if got.get(k) != want[k])
    assert not changed, f"merged bytes changed for {changed}"
    assert sorted(got) == sorted(want), "strategy set changed: regenerate golden.json"
