"""Registry of merge strategies by name."""

from __future__ import annotations

from meshmerge.crdt.strategies.base import (
    MergeInput,
    Params,
    Strategy,
    StrategyError,
    UnknownStrategy,
)
from meshmerge.crdt.strategies.linear import Linear

_REGISTRY: dict[str, Strategy] = {}


def register(strategy: Strategy, *aliases: str) -> None:
    for name in (strategy.name, *aliases):
        if name in _REGISTRY:
            raise ValueError(f"strategy name {name!r} registered twice")
        _REGISTRY[name] = strategy


def get(name: str) -> Strategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategy(
            f"unknown merge strategy {name!r}; valid: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    return sorted(_REGISTRY)


register(Linear(), "weight_average")

__all__ = ["MergeInput", "Params", "Strategy", "StrategyError", "UnknownStrategy", "get", "names", "register"]
