"""Evolutionary and genetic merges: deterministic, bounded, and they optimise their fitness."""

from __future__ import annotations

import numpy as np
import pytest

from meshmerge.crdt.strategies import MergeInput, StrategyError
from meshmerge.crdt.strategies._combine import model_gram, total_gram
from meshmerge.crdt.strategies.search import FITNESS, EvolutionaryMerge, GeneticMerge, SearchParams
from tests.crdt.strategies.helpers import make_input, run, same


def outlier_input() -> MergeInput:
    inp = make_input(5, kind="delta")
    for spec in inp.specs:
        inp.tensors[4][spec.name] = inp.tensors[4][spec.name] + np.float32(5.0)
    return inp


@pytest.mark.parametrize("cls", [EvolutionaryMerge, GeneticMerge])
def test_search_improves_geometric_fitness_and_resists_outlier(cls: type) -> None:
    inp = outlier_input()
    g = total_gram(model_gram(inp, 1 << 20, base=False), 5)
    w = [0.2] * 5
    params = SearchParams(generations=40, population=16)
    best = cls().search(g, w, inp.seed, params, FITNESS["geometric"])
    assert abs(sum(best) - 1.0) < 1e-12 and min(best) >= 0.0
    assert FITNESS["geometric"](g, w, best) > FITNESS["geometric"](g, w, w)
    assert best[4] < 0.1  # the outlier loses its weight


def test_centroid_fitness_keeps_the_weighted_mean() -> None:
    inp = make_input(4, kind="delta", weights=[1.0, 1.0, 1.0, 1.0])
    a = run("evolutionary_merge", inp, {"fitness": "centroid", "generations": 10})
    b = run("linear", inp)
    for spec in inp.specs:
        np.testing.assert_allclose(a[spec.name], b[spec.name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["evolutionary_merge", "genetic_merge"])
def test_search_is_a_pure_function_of_the_seed(name: str) -> None:
    inp = outlier_input()
    a = run(name, inp)
    b = run(name, inp)
    other = MergeInput(inp.tensors, inp.weights, inp.kind, inp.specs, bytes(32), inp.base)
    c = run(name, other)
    spec = inp.specs[0].name
    assert same(a[spec], b[spec])
    assert c[spec].shape == a[spec].shape


def test_search_parameters_validated() -> None:
    inp = make_input(3)
    with pytest.raises(StrategyError, match=r"fitness must be one of \['centroid', 'geometric'\]"):
        run("genetic_merge", inp, {"fitness": "accuracy"})
    with pytest.raises(StrategyError, match="generations must be an integer"):
        run("evolutionary_merge", inp, {"generations": 0})
