"""The contract every merge strategy follows.

A strategy is a pure function of a :class:`MergeInput` and validated
parameters. Everything that may influence the merged bytes is in the input:
the contributions in canonical order, their weights, the base model (for
deltas), and the seed (the merge state's Merkle root). Same input, same
parameters ⇒ same bytes on every replica. Strategies never read clocks, global
RNGs, thread counts or dict iteration order of anything but the canonical
input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from meshmerge.crdt.tensors import TensorSpec

Tensors = Mapping[str, npt.NDArray[Any]]

KINDS = frozenset({"weights", "delta", "lora"})


class StrategyError(ValueError):
    """A strategy cannot run on this input or with these parameters."""


class UnknownStrategy(StrategyError):
    pass


@dataclass(frozen=True)
class MergeInput:
    """What a strategy may look at.

    ``tensors[k]`` maps tensor name to a numpy array (possibly memory-mapped)
    in storage dtype (BF16 as uint16 bits), for the k-th contribution in
    canonical order. ``specs`` lists the tensors in canonical (sorted-name)
    order; strategies iterate tensors in that order.
    """

    tensors: Sequence[Tensors]
    weights: Sequence[float]
    kind: str
    specs: Sequence[TensorSpec]
    seed: bytes
    base: Tensors | None = None

    def __post_init__(self) -> None:
        if not self.tensors:
            raise StrategyError("nothing to merge: the live contribution set is empty")
        if len(self.weights) != len(self.tensors):
            raise StrategyError(f"{len(self.tensors)} contributions but {len(self.weights)} weights")
        if self.kind not in KINDS:
            raise StrategyError(f"unknown contribution kind {self.kind!r}; use one of {sorted(KINDS)}")
        if len(self.seed) != 32:
            raise StrategyError(f"seed must be 32 bytes (a Merkle root), got {len(self.seed)}")

    def weight_array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.weights, dtype=np.float64)


@dataclass(frozen=True)
class Params:
    """Base for strategy parameters. Subclasses add fields and `validate()`."""

    def validate(self) -> None:
        """Raise StrategyError naming the field and the rule it breaks."""

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Params:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StrategyError(
                f"unknown parameter(s) {unknown} for {cls.__qualname__}; valid: {sorted(known)}"
            )
        params = cls(**raw)
        params.validate()
        return params


class Strategy(ABC):
    """One merge strategy: a name, the kinds it supports, a params type, a merge."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({"weights", "delta"})
    params_type: ClassVar[type[Params]] = Params

    def parse_params(self, raw: Mapping[str, Any] | None) -> Params:
        return self.params_type.from_mapping(raw or {})

    def run(self, inp: MergeInput, raw_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate kind and parameters, then merge."""
        if inp.kind not in self.kinds:
            raise StrategyError(
                f"strategy {self.name!r} does not support {inp.kind!r} contributions; "
                f"it supports {sorted(self.kinds)}"
            )
        return self.merge(inp, self.parse_params(raw_params))

    @abstractmethod
    def merge(self, inp: MergeInput, params: Any) -> dict[str, Any]:
        """Return ``{tensor name: array in storage dtype}`` for every spec."""
