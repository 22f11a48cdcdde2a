"""Registry of merge strategies by name.

Names follow crdt-merge 0.11.0 and mergekit where they overlap, so users can
ask for what they already know. Each strategy module's docstring says what it
computes and which paper it follows.
"""

from __future__ import annotations

from meshmerge.crdt.strategies.base import (
    MergeInput,
    Params,
    Strategy,
    StrategyError,
    UnknownStrategy,
)
from meshmerge.crdt.strategies.datafree import (
    AdaMerging,
    Dam,
    RegressionMean,
    RepresentationSurgery,
    SplitUnlearnMerge,
)
from meshmerge.crdt.strategies.elementwise import (
    Della,
    DellaLinear,
    Emr,
    LedMerge,
    Nearswap,
    Passthrough,
    SafeMerge,
    Sce,
)
from meshmerge.crdt.strategies.fisher import FisherMerge
from meshmerge.crdt.strategies.fusion import ArceeFusion
from meshmerge.crdt.strategies.linear import Linear, NegativeMerge, TaskArithmetic
from meshmerge.crdt.strategies.overlap import Ram, RamPlus
from meshmerge.crdt.strategies.robust import (
    CenteredClipping,
    FoolsGold,
    GeometricMedian,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from meshmerge.crdt.strategies.scope import WeightScopeAlignment
from meshmerge.crdt.strategies.search import EvolutionaryMerge, GeneticMerge
from meshmerge.crdt.strategies.sparse import Breadcrumbs, BreadcrumbsTies, Dare, DareTies, Ties
from meshmerge.crdt.strategies.spectral import AdaRank, DualProjection, Star, SvdKnotTying
from meshmerge.crdt.strategies.spherical import Karcher, ModelStock, MultiSlerp, Slerp

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
register(TaskArithmetic())
register(NegativeMerge())
register(Ties())
register(Dare(), "dare_linear")
register(DareTies())
register(Breadcrumbs(), "model_breadcrumbs")
register(BreadcrumbsTies())
register(Slerp(), "nuslerp")
register(Karcher())
register(MultiSlerp())
register(ModelStock())
register(Median(), "coordinate_median")
register(TrimmedMean())
register(Krum())
register(MultiKrum())
register(GeometricMedian())
register(CenteredClipping())
register(FoolsGold())
register(FisherMerge())
register(Emr())
register(Della())
register(DellaLinear())
register(Nearswap())
register(Passthrough())
register(LedMerge())
register(SafeMerge())
register(Sce())
register(WeightScopeAlignment())
register(Ram())
register(RamPlus())
register(ArceeFusion())
register(EvolutionaryMerge())
register(GeneticMerge())
register(RegressionMean())
register(AdaMerging())
register(Dam())
register(RepresentationSurgery())
register(SplitUnlearnMerge())
register(Star())
register(SvdKnotTying())
register(DualProjection())
register(AdaRank())

__all__ = ["MergeInput", "Params", "Strategy", "StrategyError", "UnknownStrategy", "get", "names", "register"]
