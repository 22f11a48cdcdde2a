"""Exact magnitude thresholds (TIES / breadcrumbs) on tensors large enough for the sampled guess."""

from __future__ import annotations

import numpy as np
import pytest

from meshmerge.cext import sparse as sparse_kernels
from meshmerge.cext import using_threads
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.strategies._stream import TensorStream
from meshmerge.crdt.strategies.sparse import SAMPLE, SAMPLE_BLOCK, SAMPLED_FROM, magnitude_thresholds
from meshmerge.crdt.tensors import TensorSpec, from_f32, to_f32

M = SAMPLED_FROM + 1234


def _stream(xs: list[np.ndarray], base: np.ndarray | None, dtype: str = "F32") -> TensorStream:
    spec = TensorSpec("w", dtype, (xs[0].size,))
    inp = MergeInput([{"w": x} for x in xs], [1.0] * len(xs), "weights" if base is not None else "delta",
                     [spec], bytes(32), {"w": base} if base is not None else None)
    return TensorStream(inp, spec, 1 << 16, base=base is not None)


def _reference(xs: list[np.ndarray], base: np.ndarray | None, dtype: str, rank: int) -> list[float]:
    out = []
    for x in xs:
        v = to_f32(x, dtype).astype(np.float64)
        if base is not None:
            v = v - to_f32(base, dtype).astype(np.float64)
        mag = np.abs(v).astype(np.float32)
        out.append(float(np.partition(mag, mag.size - rank)[mag.size - rank]))
    return out


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_thresholds_match_a_full_partition(dtype: str) -> None:
    rng = np.random.default_rng(11)
    base = from_f32(rng.standard_normal(M).astype(np.float32), dtype)
    xs = [from_f32(to_f32(base, dtype) + rng.standard_normal(M).astype(np.float32) * 0.01, dtype)
          for _ in range(3)]
    ranks = [1, 7, M // 5, M // 2, M]
    got = magnitude_thresholds(_stream(xs, base, dtype), ranks)
    for j, r in enumerate(ranks):
        assert got[:, j].tolist() == _reference(xs, base, dtype, r), r


def test_thresholds_stay_exact_when_the_sample_is_misleading() -> None:
    """The sampled blocks hold zeros, the rest large values (and the other way round):
    the guessed range is wrong, the counting passes still find the exact value."""
    rng = np.random.default_rng(12)
    blocks = SAMPLE // SAMPLE_BLOCK
    starts = (np.arange(blocks, dtype=np.int64) * M) // blocks
    sampled = np.zeros(M, bool)
    for s in starts:
        sampled[s : s + SAMPLE_BLOCK] = True
    big = rng.standard_normal(M).astype(np.float32) + np.float32(10.0)
    low = np.where(sampled, np.float32(0.0), big)
    high = np.where(sampled, np.float32(1e6), rng.standard_normal(M).astype(np.float32) * np.float32(1e-3))
    ranks = [M // 5, M - 5]
    got = magnitude_thresholds(_stream([low, high], None), ranks)
    for j, r in enumerate(ranks):
        assert got[:, j].tolist() == _reference([low, high], None, "F32", r), r


def test_ties_equal_to_the_threshold_are_all_counted() -> None:
    x = np.zeros(M, np.float32)
    x[: M // 3] = 2.0
    x[M // 3 : M // 2] = -1.0
    got = magnitude_thresholds(_stream([x], None), [M // 3 + 10, M // 2, M // 2 + 1])
    assert got[0].tolist() == [1.0, 1.0, 0.0]


def _task_vectors(dtype: str, n: int = 3, seed: int = 13) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    base = from_f32(rng.standard_normal(M).astype(np.float32), dtype)
    xs = [from_f32(to_f32(base, dtype) + rng.standard_normal(M).astype(np.float32) * 0.01, dtype)
          for _ in range(n)]
    return xs, base


RANKS = [M // 100, M // 5, (9 * M) // 10, M - 3]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("mode", ["copies", "overflow", "histogram", "partial"])
def test_one_pass_copies_and_both_fallbacks_give_the_exact_thresholds(dtype: str, mode: str) -> None:
    """Copies (one pass), copies that overflow (cand_cap=1), no copies at all
    (cand_bytes=0: the histogram passes) and a budget that fits only some targets'
    copies (both kinds in one pass) all give the full partition's values."""
    xs, base = _task_vectors(dtype)
    kw: dict[str, int] = {
        "overflow": {"cand_cap": 1}, "histogram": {"cand_bytes": 0}, "partial": {"cand_bytes": 400_000},
    }.get(mode, {})
    got = magnitude_thresholds(_stream(xs, base, dtype), RANKS, **kw)
    for j, r in enumerate(RANKS):
        assert got[:, j].tolist() == _reference(xs, base, dtype, r), (mode, r)


def test_the_common_case_is_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshmerge.crdt.strategies import sparse

    calls: list[int] = []
    real = sparse.mag_range

    def counting(*args: object) -> int:
        calls.append(1)
        return int(real(*args))  # type: ignore[arg-type]

    monkeypatch.setattr(sparse, "mag_range", counting)
    xs, base = _task_vectors("F32")
    stream = _stream(xs, base)
    magnitude_thresholds(stream, RANKS)
    chunks = -(-M // stream.chunk)
    assert len(calls) == chunks  # one counting pass, no second one
    calls.clear()
    magnitude_thresholds(stream, RANKS, cand_bytes=0)
    assert len(calls) >= 2 * chunks


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thresholds_do_not_depend_on_threads_or_the_sweep(threads: int, portable: bool) -> None:
    xs, base = _task_vectors("F32", seed=14)
    want = [_reference(xs, base, "F32", r) for r in RANKS]
    sparse_kernels.use_portable_sweep(portable)
    try:
        with using_threads(threads, grain=4096):
            got = magnitude_thresholds(_stream(xs, base), RANKS)
            hist_only = magnitude_thresholds(_stream(xs, base), RANKS, cand_bytes=0)
    finally:
        sparse_kernels.use_portable_sweep(False)
    for j in range(len(RANKS)):
        assert got[:, j].tolist() == want[j]
        assert hist_only[:, j].tolist() == want[j]


@pytest.mark.parametrize("cap", [None, 1])
def test_all_equal_magnitudes_and_zeros(cap: int | None) -> None:
    rng = np.random.default_rng(15)
    same = np.where(rng.random(M) < 0.5, np.float32(0.75), np.float32(-0.75)).astype(np.float32)
    zeros = np.zeros(M, np.float32)
    mostly_zero = zeros.copy()
    mostly_zero[rng.choice(M, M // 10, replace=False)] = rng.standard_normal(M // 10).astype(np.float32)
    mostly_zero[:7] = -0.0
    xs = [same, zeros, mostly_zero]
    ranks = [1, M // 20, M // 10, M // 10 + 1, M // 2, M]
    got = magnitude_thresholds(_stream(xs, None), ranks, cand_cap=cap)
    for j, r in enumerate(ranks):
        assert got[:, j].tolist() == _reference(xs, None, "F32", r), r
    assert got[0].tolist() == [0.75] * len(ranks)
    assert got[1].tolist() == [0.0] * len(ranks)


def test_ties_straddling_the_threshold_inside_the_bracket() -> None:
    """Many copies of the threshold value itself, with values just above and below."""
    rng = np.random.default_rng(16)
    x = rng.standard_normal(M).astype(np.float32)
    t = np.float32(np.sort(np.abs(x))[M - M // 5])
    x[rng.choice(M, M // 50, replace=False)] = -t
    up, down = np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(0))
    x[rng.choice(M, 100, replace=False)] = up
    x[rng.choice(M, 100, replace=False)] = down
    ranks = [M // 5 - 50, M // 5, M // 5 + 1, M // 5 + M // 100]
    for kw in ({}, {"cand_cap": 1}):
        got = magnitude_thresholds(_stream([x], None), ranks, **kw)
        for j, r in enumerate(ranks):
            assert got[:, j].tolist() == _reference([x], None, "F32", r), (kw, r)


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_strategy_bytes_are_the_same_with_and_without_copies(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshmerge.crdt import strategies
    from meshmerge.crdt.strategies import sparse

    xs, base = _task_vectors("BF16", n=4, seed=17)
    spec = TensorSpec("w", "BF16", (M,))
    inp = MergeInput([{"w": x} for x in xs], [1.0, 2.0, 0.5, 1.5], "weights", [spec], bytes(32), {"w": base})
    params = {"density": 0.3} if name == "ties" else {"density": 0.6, "gamma": 0.05}
    one_pass = strategies.get(name).run(inp, params)["w"]
    monkeypatch.setattr(sparse, "CAND_SLACK", 0.0)
    monkeypatch.setattr(sparse, "CAND_EXTRA", 1)  # every copy overflows: histogram passes
    fallback = strategies.get(name).run(inp, params)["w"]
    assert one_pass.tobytes() == fallback.tobytes()
