"""Per-layer budgets: allocators turn a BudgetSpec into the tokens each layer keeps per KV head.

Every allocator keeps the same total, num_layers x tokens. `uniform` gives every layer `tokens`;
`pyramid` (PyramidKV) fixes a linear schedule at open from the geometry and the protected
tokens; `adaptive` ranks the scores of every layer at once, so it sets `needs_scores` and gets
them (all layers, computed before any selection) in `allocate`. It only runs with a CAOTE-family
wrapper, whose scores are output-error units comparable across layers.
"""

from __future__ import annotations

import math
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
    # Wrappers the allocator works with (None = any); checked by make_allocator.
    wrappers: ClassVar[tuple[str, ...] | None] = None
    tokens: int
    sink: int = 0  # the session's protected tokens (resolved), for allocators that need them
    recent: int = 0

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


@dataclass(frozen=True)
class Pyramid(BudgetAllocator):
    """PyramidKV's linear schedule (arXiv 2406.02069), the total of `uniform`.

    With B = tokens, w = the protected tokens (sink + recent: kept in every layer, as PyramidKV keeps
    its window) and beta = PYRAMID_BETA: min = (B - w) / beta,
    max = 2 (B - w) - min, layer l of L gets w + max - l (max - min) / (L - 1). The exact values
    average B; they are rounded down and the remainder goes, one token each, to the layers with
    the largest fractional parts (ties: the lower layer), so the total is exactly L x B and the
    schedule stays non-increasing with depth.
    """

    name = "pyramid"
    description = "PyramidKV linear schedule (beta 20, window = sink + recent tokens): more in lower layers, same total"

    def initial_budgets(self, geometry: Geometry) -> list[int]:
        return pyramid_budgets(self.tokens, geometry.num_layers, self.sink + self.recent)


PYRAMID_BETA = 20  # PyramidKV's beta: the top layer keeps (tokens - window) / beta + window


def pyramid_budgets(tokens: int, num_layers: int, window: int, beta: int = PYRAMID_BETA) -> list[int]:
    """The pyramid schedule in exact integer arithmetic (see Pyramid)."""
    if num_layers <= 1:
        return [tokens] * num_layers
    if window >= tokens:
        raise InvalidArgument("budget.tokens", f"pyramid needs tokens above the {window} protected (sink + recent) tokens, got {tokens}")
    free, last = tokens - window, num_layers - 1
    # w + max - l (max - min) / (L - 1) = w + free ((2 beta - 1)(L - 1) - 2 l (beta - 1)) / (beta (L - 1))
    denominator = beta * last
    numerators = [free * ((2 * beta - 1) * last - 2 * layer * (beta - 1)) for layer in range(num_layers)]
    whole = [window + n // denominator for n in numerators]
    remainder = num_layers * tokens - sum(whole)
    # Largest fractional part first, ties to the lower layer (stable sort).
    for layer in sorted(range(num_layers), key=lambda i: -(numerators[i] % denominator))[:remainder]:
        whole[layer] += 1
    return whole


# The adaptive allocator's per-layer floor, as a fraction of `tokens` (rounded up; never below
# sink + recent + 1 so every layer can still score a token). A module constant for now.
ADAPTIVE_FLOOR_FRACTION = 0.25
# Wrappers whose scores are output-error units, comparable across layers.
ADAPTIVE_WRAPPERS = ("caote", "fastcaote")


@dataclass(frozen=True)
class Adaptive(BudgetAllocator):
    """One global choice per report: keep the tokens with the largest CAOTE error model-wide.

    Each layer's tokens are ranked by their score averaged over the layer's KV heads (every head
    of a layer keeps the same count), protected tokens (sink, recent) as +inf. Every layer first
    gets its floor (its best `floor` tokens, or all of them when shorter), then the rest of the
    total min(L x tokens, sum of cache lengths) goes to the globally highest remaining scores.
    """

    name = "adaptive"
    description = ("global CAOTE ranking across layers, floor ceil(tokens / 4) per layer, same total; "
                   "wrapper caote or fastcaote only")
    needs_scores = True
    wrappers = ADAPTIVE_WRAPPERS

    @property
    def floor(self) -> int:
        return max(math.ceil(ADAPTIVE_FLOOR_FRACTION * self.tokens), self.sink + self.recent + 1)

    def initial_budgets(self, geometry: Geometry) -> list[int]:
        return [self.tokens] * geometry.num_layers

    def allocate(
        self,
        budgets: Sequence[int],
        cache_lengths: Sequence[int],
        scores: Sequence[np.ndarray] | None = None,
    ) -> list[int]:
        assert scores is not None and len(scores) == len(cache_lengths), "adaptive needs every layer's scores"
        lengths = np.asarray(cache_lengths, dtype=np.int64)
        floors = np.minimum(lengths, self.floor)
        target = min(len(lengths) * self.tokens, int(lengths.sum()))
        extra = target - int(floors.sum())
        if extra <= 0:
            return floors.tolist()
        candidates, layers = [], []
        for layer, (score, floor) in enumerate(zip(scores, floors)):
            length = score.shape[-1]
            if length <= floor:
                continue
            # Summed over heads: every layer has as many heads, so it ranks as the head average.
            # Protected tokens (+inf) always fall within the floor (floor > sink + recent).
            total = score[:, self.sink : length - self.recent].sum(axis=0, dtype=np.float64)
            # Drop the layer's `floor` best tokens (its floor takes them); the rest compete.
            others = int(length - floor)
            candidates.append(np.partition(total, others)[:others])
            layers.append(layer)
        pool = np.concatenate(candidates)
        chosen = np.zeros(pool.size, dtype=np.int64)
        chosen[np.argpartition(pool, pool.size - extra)[pool.size - extra:]] = 1
        starts = np.cumsum([0] + [c.size for c in candidates[:-1]])
        counts = np.zeros(len(lengths), dtype=np.int64)
        counts[layers] = np.add.reduceat(chosen, starts)
        return (floors + counts).tolist()


ALLOCATORS: dict[str, type[BudgetAllocator]] = {cls.name: cls for cls in (Uniform, Pyramid, Adaptive)}


def make_allocator(name: str, tokens: int, sink: int = 0, recent: int = 0, wrapper: str | None = None) -> BudgetAllocator:
    """Builds an allocator by BudgetSpec name ("" = uniform); InvalidArgument names the field.

    `sink` and `recent` are the session's resolved protected tokens; `wrapper` the policy's
    wrapper name (None: not checked yet, as before the policy is resolved).
    """
    if tokens <= 0:
        raise InvalidArgument("budget.tokens", f"must be > 0, got {tokens}")
    try:
        cls = ALLOCATORS[name or Uniform.name]
    except KeyError:
        raise InvalidArgument("budget.allocator", f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}") from None
    if cls.wrappers is not None and wrapper is not None and wrapper not in cls.wrappers:
        raise InvalidArgument(
            "budget.allocator",
            f"{cls.name} ranks scores across layers and needs wrapper {' or '.join(cls.wrappers)} (output-error "
            f"units); the scores of wrapper {wrapper!r} are not comparable across layers",
        )
    return cls(tokens, sink=sink, recent=recent)
