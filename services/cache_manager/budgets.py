"""Per-layer budgets: allocators turn a BudgetSpec into the tokens each layer keeps per KV head.

Only `uniform` exists so far. The interface already carries what the others need: `pyramid`
needs only the geometry; `adaptive` ranks the scores of every layer at once, so it sets
`needs_scores` and gets them (all layers, computed before any selection) in `allocate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.geometry import Geometry


@dataclass(frozen=True)
class BudgetAllocator(ABC):
    """Spreads `tokens` (average per KV head per layer) over the layers of a model."""

    name: ClassVar[str]
    description: ClassVar[str]
    # True when `allocate` needs every layer's scores (then the manager scores every layer).
    needs_scores: ClassVar[bool] = False
    tokens: int

    @abstractmethod
    def initial_budgets(self, geometry: Geometry) -> list[int]:
        """Budgets announced at OpenSession, one per layer."""

    def allocate(
        self,
        budgets: Sequence[int],
        cache_lengths: Sequence[int],
        scores: Sequence[np.ndarray] | None = None,
    ) -> list[int]:
        """Budgets for one report, from the previous ones and the layers' cache lengths (new
        tokens included). Static allocators keep the budgets they started with."""
        return list(budgets)


@dataclass(frozen=True)
class Uniform(BudgetAllocator):
    name = "uniform"
    description = "every layer keeps `tokens` per KV head"

    def initial_budgets(self, geometry: Geometry) -> list[int]:
        return [self.tokens] * geometry.num_layers


ALLOCATORS: dict[str, type[BudgetAllocator]] = {cls.name: cls for cls in (Uniform,)}


def make_allocator(name: str, tokens: int) -> BudgetAllocator:
    """Builds an allocator by BudgetSpec name ("" = uniform); InvalidArgument names the field."""
    if tokens <= 0:
        raise InvalidArgument("budget.tokens", f"must be > 0, got {tokens}")
    try:
        cls = ALLOCATORS[name or Uniform.name]
    except KeyError:
        raise InvalidArgument("budget.allocator", f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}") from None
    return cls(tokens)
