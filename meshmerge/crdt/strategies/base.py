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

    def _number(
        self, field: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
    ) -> None:
        """Check that ``field`` is a real number in the given interval."""
        v = getattr(self, field)
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            raise StrategyError(f"{field} must be a number, got {v!r}")
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise StrategyError(f"{field} must lie in {left}{lo}, {hi}{right}, got {v!r}")

    def _integer(self, field: str, lo: int, hi: int) -> None:
        v = getattr(self, field)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise StrategyError(f"{field} must be an integer in [{lo}, {hi}], got {v!r}")

    def _boolean(self, field: str) -> None:
        if not isinstance(getattr(self, field), bool):
            raise StrategyError(f"{field} must be a boolean")

    def _choice(self, field: str, choices: tuple[str, ...]) -> None:
        if getattr(self, field) not in choices:
            raise StrategyError(f"{field} must be one of {list(choices)}, got {getattr(self, field)!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> Params:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StrategyError(
                f"unknown parameter(s) {unknown} for {cls.__qualname__}; valid: {sorted(known)}"
            )
        try:
            params = cls(**raw)
        except TypeError as e:
            raise StrategyError(f"bad parameters for {cls.__qualname__}: {e}") from None
        params.validate()
        return params


#: Elements per streamed chunk. Results never depend on it (tests check).
DEFAULT_CHUNK = 1 << 20


class Strategy(ABC):
    """One merge strategy: a name, the kinds it supports, a params type, a merge."""

    name: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({"weights", "delta"})
    params_type: ClassVar[type[Params]] = Params

    def parse_params(self, raw: Mapping[str, Any] | None) -> Params:
        return self.params_type.from_mapping(raw or {})

    def run(
        self,
        inp: MergeInput,
        raw_params: Mapping[str, Any] | None = None,
        *,
        chunk_elements: int | None = None,
    ) -> dict[str, Any]:
        """Validate kind and parameters, then merge.

        ``chunk_elements`` only trades memory for per-chunk overhead; the
        merged bytes are the same for every value.
        """
        if inp.kind not in self.kinds:
            raise StrategyError(
                f"strategy {self.name!r} does not support {inp.kind!r} contributions; "
                f"it supports {sorted(self.kinds)}"
            )
        chunk = DEFAULT_CHUNK if chunk_elements is None else chunk_elements
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 8 or chunk % 8:
            raise StrategyError(f"chunk_elements must be a positive multiple of 8, got {chunk!r}")
        params = self.parse_params(raw_params)
        if len(inp.tensors) < self.min_inputs:
            raise StrategyError(
                f"strategy {self.name!r} needs at least {self.min_inputs} contributions, "
                f"got {len(inp.tensors)}"
            )
        return self.merge(inp, params, chunk)

    #: Fewest contributions the strategy is defined for.
    min_inputs: ClassVar[int] = 1

    @abstractmethod
    def merge(self, inp: MergeInput, params: Any, chunk: int) -> dict[str, Any]:
        """Return ``{tensor name: array in storage dtype}`` for every spec."""
