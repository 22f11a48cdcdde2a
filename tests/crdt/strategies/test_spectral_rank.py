"""adarank's energy rank by bisection against the linear scan it replaced."""

from __future__ import annotations

import math
import random

from meshmerge.crdt.strategies.spectral import energy_rank


def linear_scan(lam: list[float], energy: float) -> int:
    goal = energy * math.fsum(lam)
    for k in range(1, len(lam) + 1):
        if math.fsum(lam[:k]) >= goal:
            return k
    return len(lam)


def test_bisection_finds_the_same_rank() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(0, 40)
        lam = sorted((rng.choice([0.0, rng.random(), rng.random() * 1e-20, rng.random() * 1e30])
                      for _ in range(n)), reverse=True)
        energy = rng.choice([1.0, 0.9, 0.5, 1e-9, rng.random()])
        assert energy_rank(lam, energy) == linear_scan(lam, energy), (lam, energy)
    # equal values and a goal met exactly by a prefix
    assert energy_rank([1.0, 1.0, 1.0, 1.0], 0.5) == linear_scan([1.0, 1.0, 1.0, 1.0], 0.5) == 2
    assert energy_rank([0.0, 0.0], 0.9) == 1
