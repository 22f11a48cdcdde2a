"""Bad input gets a typed StrategyError that says what is wrong, never a crash."""

from __future__ import annotations

import re

import numpy as np
import pytest

from meshmerge.crdt import strategies
from meshmerge.crdt.strategies import MergeInput, StrategyError, UnknownStrategy
from meshmerge.crdt.tensors import TensorSpec
from tests.crdt.strategies.cases import RUNNABLE
from tests.crdt.strategies.helpers import make_input, run


def with_tensor(inp: MergeInput, k: int, name: str, value: np.ndarray) -> MergeInput:
    tensors = [dict(t) for t in inp.tensors]
    tensors[k][name] = value
    return MergeInput(tensors, inp.weights, inp.kind, inp.specs, inp.seed, inp.base)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_contribution_is_rejected(name: str, bad: float) -> None:
    inp = make_input(5)
    spec = inp.specs[1]
    arr = inp.tensors[3][spec.name].copy()
    arr.reshape(-1)[spec.numel // 2] = bad
    msg = re.escape(f"contribution 3 tensor '{spec.name}' holds NaN or Inf")
    with pytest.raises(StrategyError, match=msg):
        run(name, with_tensor(inp, 3, spec.name, arr), RUNNABLE[name], chunk_elements=64)


def test_nonfinite_base_is_rejected() -> None:
    inp = make_input(3)
    base = dict(inp.base)
    name = inp.specs[0].name
    base[name] = base[name].copy()
    base[name].reshape(-1)[0] = np.nan
    bad = MergeInput(inp.tensors, inp.weights, inp.kind, inp.specs, inp.seed, base)
    with pytest.raises(StrategyError, match=r"base model tensor .* NaN or Inf"):
        run("ties", bad)


@pytest.mark.parametrize("name", sorted(RUNNABLE))
def test_shape_and_dtype_mismatch(name: str) -> None:
    inp = make_input(3)
    spec = inp.specs[0]
    wrong_shape = np.zeros((spec.numel, 1), dtype=np.float32)
    with pytest.raises(StrategyError, match="shape"):
        run(name, with_tensor(inp, 1, spec.name, wrong_shape), RUNNABLE[name])
    wrong_dtype = inp.tensors[1][spec.name].astype(np.float16)
    with pytest.raises(StrategyError, match="dtype float16 does not match spec F32"):
        run(name, with_tensor(inp, 1, spec.name, wrong_dtype), RUNNABLE[name])
    tensors = [dict(t) for t in inp.tensors]
    del tensors[2][spec.name]
    missing = MergeInput(tensors, inp.weights, inp.kind, inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match="contribution 2 has no tensor"):
        run(name, missing, RUNNABLE[name])


def test_empty_set_and_weight_count() -> None:
    spec = [TensorSpec("w", "F32", (2,))]
    with pytest.raises(StrategyError, match="empty"):
        MergeInput([], [], "weights", spec, bytes(32))
    with pytest.raises(StrategyError, match="weights"):
        MergeInput([{"w": np.zeros(2, np.float32)}], [1.0, 2.0], "weights", spec, bytes(32))


def test_zero_negative_and_nonfinite_weights() -> None:
    inp = make_input(3, weights=[1.0, -1.0, 0.0])
    with pytest.raises(StrategyError, match="total contribution weight is zero"):
        run("linear", inp)
    with pytest.raises(StrategyError, match="weight to be > 0"):
        run("ties", inp)
    with pytest.raises(StrategyError, match="non-negative"):
        run("slerp", inp)
    with pytest.raises(StrategyError, match="finite"):
        run("linear", make_input(2, weights=[1.0, float("nan")]))


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(UnknownStrategy, match=r"valid: .*linear.*ties"):
        strategies.get("tie")


def test_parameters_are_validated_by_name() -> None:
    inp = make_input(3)
    with pytest.raises(StrategyError, match=r"unknown parameter\(s\) \['densty'\].*valid: \["):
        run("ties", inp, {"densty": 0.5})
    with pytest.raises(StrategyError, match=r"density must lie in \(0.0, 1.0\], got 0"):
        run("ties", inp, {"density": 0})
    with pytest.raises(StrategyError, match="density must be a number"):
        run("dare", inp, {"density": "half"})
    with pytest.raises(StrategyError, match="majority_sign must be one of"):
        run("ties", inp, {"majority_sign": "most"})
    with pytest.raises(StrategyError, match=r"density \+ gamma must be <= 1"):
        run("breadcrumbs", inp, {"density": 0.9, "gamma": 0.2})
    with pytest.raises(StrategyError, match="iterations must be an integer"):
        run("geometric_median", inp, {"iterations": 2.5})
    with pytest.raises(StrategyError, match="t needs exactly 2"):
        run("slerp", inp, {"t": 0.5})
    with pytest.raises(StrategyError, match="chunk_elements"):
        run("linear", inp, chunk_elements=12)


def test_kinds_and_missing_base() -> None:
    inp = make_input(3)
    lora = MergeInput(inp.tensors, inp.weights, "lora", inp.specs, inp.seed, inp.base)
    with pytest.raises(StrategyError, match="does not support 'lora'"):
        run("ties", lora)
    no_base = make_input(3, with_base=False)
    for name in ("ties", "dare", "task_arithmetic", "model_stock", "foolsgold"):
        with pytest.raises(StrategyError, match="base model"):
            run(name, no_base)
    assert run("linear", lora)  # factor-wise average is defined for LoRA


def test_strategies_that_need_more_inputs() -> None:
    inp = make_input(2)
    with pytest.raises(StrategyError, match="at least 3"):
        run("krum", inp)
    with pytest.raises(StrategyError, match=r"N > 2f \+ 2"):
        run("krum", make_input(4), {"f": 1})


def test_fisher_without_companions_says_what_is_missing() -> None:
    with pytest.raises(StrategyError, match=re.escape("Fisher companion tensor '<name>.fisher'")):
        run("fisher_merge", make_input(2))


def test_fisher_companion_without_its_tensor_is_an_error_not_dropped() -> None:
    spec = TensorSpec("w.fisher", "F32", (4,))
    ones = np.ones(4, np.float32)
    inp = MergeInput([{"w.fisher": ones}, {"w.fisher": ones}], [1.0, 1.0], "weights", [spec], bytes(32))
    with pytest.raises(StrategyError, match=re.escape("Fisher tensor(s) ['w.fisher'] have no tensor")):
        run("fisher_merge", inp)


def test_empty_tensor_is_fine() -> None:
    spec = [TensorSpec("e", "F32", (0, 3))]
    t = {"e": np.zeros((0, 3), np.float32)}
    inp = MergeInput([t, t, t], [1.0, 1.0, 1.0], "delta", spec, bytes(32))
    for name in RUNNABLE:
        out = run(name, inp, RUNNABLE[name])
        assert out["e"].shape == (0, 3)
