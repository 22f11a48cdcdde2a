"""Properties: identity on identical inputs, chunk-size and arrival-order independence."""

from __future__ import annotations

import numpy as np
import pytest

from meshmerge.cext import using_threads
from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput
from meshmerge.crdt.tensors import TensorSpec, from_f32
from tests.crdt.strategies.cases import IDENTITY, PERMUTATION, RUNNABLE
from tests.crdt.strategies.helpers import make_input, run, same


def test_every_registered_strategy_is_classified() -> None:
    special = {"fisher_merge", "nearswap", "passthrough", "arcee_fusion"}  # own test files
    classified = set(RUNNABLE) | special
    assert set(strategies.names()) == classified


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_chunk_size_does_not_change_bytes(name: str, dtype: str) -> None:
    inp = make_input(5, dtype=dtype)
    ref = run(name, inp, RUNNABLE[name])
    for chunk in (8, 40, 296):
        out = run(name, inp, RUNNABLE[name], chunk_elements=chunk)
        for spec in inp.specs:
            assert same(out[spec.name], ref[spec.name]), (chunk, spec.name)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_thread_count_does_not_change_bytes(name: str, dtype: str) -> None:
    """Kernels split work over threads in blocks of ``grain`` elements; a tiny grain
    makes even these small tensors run on several threads."""
    inp = make_input(5, dtype=dtype)
    with using_threads(1):
        ref = run(name, inp, RUNNABLE[name])
    for threads in (2, 3):
        with using_threads(threads, grain=8):
            out = run(name, inp, RUNNABLE[name], chunk_elements=64)
        for spec in inp.specs:
            assert same(out[spec.name], ref[spec.name]), (threads, spec.name)


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("name", sorted(IDENTITY))
def test_identical_inputs_come_back(name: str, dtype: str) -> None:
    one = make_input(1, dtype=dtype)
    w = [1.0, 2.0, 1.0, 3.0, 1.0]
    inp = MergeInput([one.tensors[0]] * 5, w, "weights", one.specs, one.seed, one.base)
    out = run(name, inp, IDENTITY[name])
    for spec in inp.specs:
        assert same(out[spec.name], one.tensors[0][spec.name]), spec.name


def test_foolsgold_gives_clones_no_weight() -> None:
    one = make_input(1)
    inp = MergeInput([one.tensors[0]] * 4, [1.0] * 4, "weights", one.specs, one.seed, one.base)
    out = run("foolsgold", inp)
    for spec in inp.specs:
        assert same(out[spec.name], one.base[spec.name])


@pytest.mark.parametrize("name", sorted(PERMUTATION))
def test_arrival_order_does_not_change_bytes(name: str) -> None:
    inp = make_input(4, quantize=True, weights=[1.0] * 4)
    ref = run(name, inp, PERMUTATION[name])
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2]):
        p = MergeInput([inp.tensors[k] for k in perm], [1.0] * 4, inp.kind, inp.specs, inp.seed, inp.base)
        out = run(name, p, PERMUTATION[name])
        for spec in inp.specs:
            assert same(out[spec.name], ref[spec.name]), (perm, spec.name)


def test_median_is_order_free_on_any_input() -> None:
    inp = make_input(6, weights=[1.0, 5.0, 2.0, 1.0, 1.0, 7.0])
    ref = run("median", inp)
    p = MergeInput(inp.tensors[::-1], inp.weights[::-1], inp.kind, inp.specs, inp.seed, inp.base)
    out = run("median", p)
    for spec in inp.specs:
        assert same(out[spec.name], ref[spec.name])


def test_dare_masks_depend_on_seed_only_through_the_seed() -> None:
    inp = make_input(3)
    a = run("dare", inp, {"density": 0.5})
    b = run("dare", inp, {"density": 0.5})
    other = MergeInput(inp.tensors, inp.weights, inp.kind, inp.specs, bytes(32), inp.base)
    c = run("dare", other, {"density": 0.5})
    name = inp.specs[0].name
    assert same(a[name], b[name])
    assert not same(a[name], c[name])


def test_ties_divides_by_weight_of_agreeing_entries() -> None:
    """crdt-merge divides by the count of agreeing entries; identical inputs shrink by N there."""
    inp = make_input(1, kind="delta")
    big = MergeInput([inp.tensors[0]] * 4, [0.5, 1.0, 2.0, 4.0], "delta", inp.specs, inp.seed)
    out = run("ties", big, {"density": 1.0})
    for spec in inp.specs:
        assert same(out[spec.name], inp.tensors[0][spec.name])


def test_outputs_have_storage_dtype_and_shape() -> None:
    for dtype, np_dtype in (("F32", np.float32), ("F16", np.float16), ("BF16", np.uint16)):
        inp = make_input(3, dtype=dtype)
        for name in RUNNABLE:
            out = run(name, inp, RUNNABLE[name])
            assert sorted(out) == [s.name for s in inp.specs]
            for spec in inp.specs:
                assert out[spec.name].dtype == np_dtype and out[spec.name].shape == spec.shape


@pytest.mark.parametrize("name", ["karcher", "geometric_median", "safe_merge"])
def test_large_tensors_give_the_same_bytes_for_any_threads_and_chunks(name: str) -> None:
    """Tensors spanning several Gram spans (16384 elements) and kernel blocks, so threads
    and chunk boundaries really split the work."""
    m = 3 * 16384 + 777
    rng = np.random.default_rng(5)
    base = rng.standard_normal(m).astype(np.float32)
    xs = [base + np.float32(0.01) * rng.standard_normal(m).astype(np.float32) for _ in range(6)]
    spec = [TensorSpec("w", "BF16" if name == "safe_merge" else "F32", (m,))]
    if name == "safe_merge":
        xs, base = [from_f32(x, "BF16") for x in xs], from_f32(base, "BF16")
    inp = MergeInput([{"w": x} for x in xs], [1.0, 2.0, 1.0, 3.0, 1.0, 1.0], "weights", spec, bytes(32),
                     {"w": base})
    with using_threads(1):
        ref = strategies.get(name).run(inp, {})["w"]
    for threads, chunk in ((2, 8), (3, 16384 + 8), (2, 1 << 20)):
        with using_threads(threads, grain=1024):
            out = strategies.get(name).run(inp, {}, chunk_elements=chunk)["w"]
        assert out.tobytes() == ref.tobytes(), (threads, chunk)
