"""Evolutionary and genetic merges: deterministic searches over merge coefficients.

Both search coefficient vectors ``c`` on the probability simplex for the
merged model ``b + sum_k c_k (x_k - b)`` (or ``sum_k c_k x_k``) that maximise
a fitness. The merge layer has no evaluation data, so fitness functions are
computed from the contributions themselves, on the whole-model Gram matrix
(one streaming pass), and are pluggable: :func:`register_fitness` adds a named,
deterministic function ``(gram, weights, c) -> float``.

Randomness comes from the counter-based PRNG keyed by the merge seed, so the
search is a pure function of the input; the budget is fixed
(``generations x population`` fitness evaluations); ties are broken by the
lower candidate index. Arithmetic is IEEE ``+ - * / sqrt`` and ``math.fsum``.

* ``evolutionary_merge`` — a (1 + lambda) evolution strategy (Rechenberg;
  Schwefel) with the 1/5-success step-size rule, in the spirit of
  Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes"
  (who use CMA-ES with task evaluations).
* ``genetic_merge`` — a genetic algorithm (tournament selection, uniform
  crossover, uniform mutation, elitism), as in Mergenetic (Minut et al. 2025).

Built-in fitness functions (higher is better):
* ``centroid``: ``-sum_k w_k |m - x_k|^2`` (optimum: the weighted mean);
* ``geometric``: ``-sum_k w_k |m - x_k|`` (optimum: the weighted geometric
  median, robust to outliers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshmerge.cext import stream_key, uniform_f64
from meshmerge.crdt.strategies._combine import combine_tensor, matvec, model_gram, quad, total_gram
from meshmerge.crdt.strategies._stream import checked_weights
from meshmerge.crdt.strategies.base import MergeInput, Params, Strategy, StrategyError

Gram = list[list[float]]
Fitness = Callable[[Gram, list[float], list[float]], float]


def _distances2(g: Gram, c: list[float]) -> list[float]:
    gc = matvec(g, c)
    cgc = quad(g, c, c)
    return [max(0.0, math.fsum([g[k][k], -2.0 * gc[k], cgc])) for k in range(len(c))]


def centroid_fitness(g: Gram, w: list[float], c: list[float]) -> float:
    return -math.fsum(wk * d for wk, d in zip(w, _distances2(g, c), strict=True))


def geometric_fitness(g: Gram, w: list[float], c: list[float]) -> float:
    return -math.fsum(wk * math.sqrt(d) for wk, d in zip(w, _distances2(g, c), strict=True))


FITNESS: dict[str, Fitness] = {"centroid": centroid_fitness, "geometric": geometric_fitness}


def register_fitness(name: str, fn: Fitness) -> None:
    """Add a deterministic fitness (pure function of Gram matrix, weights, coefficients)."""
    if name in FITNESS:
        raise ValueError(f"fitness {name!r} registered twice")
    FITNESS[name] = fn


def _uniforms(seed: bytes, label: str, step: int, count: int) -> list[float]:
    u = np.empty(count, dtype=np.float64)
    uniform_f64(stream_key(seed, label, step), 0, u)
    return [float(x) for x in u]


def _simplex(c: list[float], fallback: list[float]) -> list[float]:
    c = [max(0.0, x) for x in c]
    total = math.fsum(c)
    return [x / total for x in c] if total > 0.0 else list(fallback)


@dataclass(frozen=True)
class SearchParams(Params):
    """generations, population: the fixed budget; sigma: initial mutation half-width;
    fitness: name of a registered fitness function."""

    generations: int = 30
    population: int = 16
    sigma: float = 0.2
    fitness: str = "geometric"

    def validate(self) -> None:
        self._integer("generations", 1, 10_000)
        self._integer("population", 2, 1024)
        self._number("sigma", 0.0, 10.0, lo_open=True)
        if self.fitness not in FITNESS:
            raise StrategyError(f"fitness must be one of {sorted(FITNESS)}, got {self.fitness!r}")


class _Search(Strategy):
    kinds = frozenset({"weights", "delta"})
    params_type = SearchParams

    def merge(self, inp: MergeInput, params: SearchParams, chunk: int) -> dict[str, Any]:
        w = checked_weights(inp)
        if np.any(w < 0) or float(w.sum()) == 0.0:
            raise StrategyError("weights must be >= 0 with a positive total")
        wn = [float(x) / math.fsum(float(y) for y in w) for x in w]
        use_base = inp.kind == "weights" and inp.base is not None
        g = total_gram(model_gram(inp, chunk, base=use_base), len(wn))
        best = self.search(g, wn, inp.seed, params, FITNESS[params.fitness])
        coef = np.array(best, dtype=np.float64)
        return {spec.name: combine_tensor(inp, spec, coef, chunk, base=use_base) for spec in inp.specs}

    def search(self, g: Gram, w: list[float], seed: bytes, p: SearchParams, fit: Fitness) -> list[float]:
        raise NotImplementedError


class EvolutionaryMerge(_Search):
    name = "evolutionary_merge"

    def search(self, g: Gram, w: list[float], seed: bytes, p: SearchParams, fit: Fitness) -> list[float]:
        n = len(w)
        parent, score, sigma = list(w), fit(g, w, w), p.sigma
        for gen in range(p.generations):
            u = _uniforms(seed, "evolutionary_merge", gen, p.population * n)
            improved = 0
            best_child, best_score = parent, score
            for j in range(p.population):
                child = _simplex([parent[k] + sigma * (2.0 * u[j * n + k] - 1.0) for k in range(n)], parent)
                s = fit(g, w, child)
                if s > score:
                    improved += 1
                if s > best_score:
                    best_child, best_score = child, s
            parent, score = best_child, best_score
            sigma = sigma * 1.5 if improved * 5 > p.population else sigma * 0.6
        return parent


def _tournament(pop: list[list[float]], scores: list[float], a: float, b: float) -> list[float]:
    """Binary tournament between the candidates picked by uniforms a and b (lower index wins ties)."""
    size = len(pop)
    i, k = int(a * size) % size, int(b * size) % size
    return pop[i] if (scores[i], -i) >= (scores[k], -k) else pop[k]


class GeneticMerge(_Search):
    name = "genetic_merge"

    def search(self, g: Gram, w: list[float], seed: bytes, p: SearchParams, fit: Fitness) -> list[float]:
        n, size = len(w), p.population
        init = _uniforms(seed, "genetic_merge/init", 0, size * n)
        pop = [list(w)] + [_simplex(init[j * n:(j + 1) * n], w) for j in range(1, size)]
        scores = [fit(g, w, c) for c in pop]
        for gen in range(p.generations):
            u = _uniforms(seed, "genetic_merge", gen, size * (4 + 2 * n))
            elite = max(range(size), key=lambda j: (scores[j], -j))
            nxt, nxt_scores = [pop[elite]], [scores[elite]]
            for j in range(1, size):
                r = u[j * (4 + 2 * n):(j + 1) * (4 + 2 * n)]
                mum, dad = _tournament(pop, scores, r[0], r[1]), _tournament(pop, scores, r[2], r[3])
                child = [mum[k] if r[4 + k] < 0.5 else dad[k] for k in range(n)]
                child = [child[k] + p.sigma * (2.0 * r[4 + n + k] - 1.0) * 0.5 for k in range(n)]
                child = _simplex(child, w)
                nxt.append(child)
                nxt_scores.append(fit(g, w, child))
            pop, scores = nxt, nxt_scores
        best = max(range(size), key=lambda j: (scores[j], -j))
        return pop[best]
