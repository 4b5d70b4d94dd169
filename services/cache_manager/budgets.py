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

from kvevict.cache_manager import kernels
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.geometry import Geometry
from kvevict.cache_manager.selection import Ranking


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

    def allocate_flat(self, budgets: Sequence[int], cache_lengths: Sequence[int], ranking: Ranking | None) -> list[int]:
        """`allocate` from a report's Ranking (the batched decision path); the same budgets."""
        if not self.needs_scores:
            return self.allocate(budgets, cache_lengths)
        assert ranking is not None, f"{self.name} needs every layer's scores"
        return self.allocate(budgets, cache_lengths, [ranking.exact_layer(layer) for layer in range(len(cache_lengths))])


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

    def allocate_flat(self, budgets: Sequence[int], cache_lengths: Sequence[int], ranking: Ranking | None) -> list[int]:
        """allocate() in one selection over the whole model, from the ranking's float32
        estimates, with the same budgets.

        allocate() keeps, above the floors, the `extra` best head-summed float64 totals of what
        the floors leave. Let T be the K-th largest total over every competing layer, K = extra +
        what the floors take. When T occurs once and every competing layer has more totals above
        T than its floor takes, the floors' picks all lie above T and the `extra` best of the
        rest are exactly the other totals >= T: a layer gets its floor plus its count of totals >=
        T minus its floor's picks, whatever order allocate()'s partitions leave ties in.

        T is found on estimated totals: each within a relative `e` of its exact value (the
        ranking's error plus float32's summation over heads). The totals whose estimates lie
        within a relative band `beta` >> e around the estimated K-th largest are computed exactly
        (the very sums allocate() computes, from the layer's exact scores); the others are
        certainly above or below the band's exact values. If T is then among the band, unique,
        clear of the band's edges, and every floor's picks lie above it, the budgets follow;
        otherwise (ties at T, a layer left with its floor alone, estimates not good enough)
        allocate() decides on the exact scores.
        """
        assert ranking is not None, "adaptive needs every layer's scores"
        layout = ranking.layout
        floor = self.floor
        lengths = np.asarray(cache_lengths, dtype=np.int64)
        floors = np.minimum(lengths, floor)
        target = min(len(lengths) * self.tokens, int(lengths.sum()))
        extra = target - int(floors.sum())
        if extra <= 0:
            return floors.tolist()

        def exact() -> list[int]:
            return self.allocate(budgets, cache_lengths, [ranking.exact_layer(layer) for layer in range(len(lengths))])

        sink, recent = self.sink, self.recent
        competing = [n > floor for n in cache_lengths]
        layers = [layer for layer, c in enumerate(competing) if c]
        error = ranking.approx_error + (layout.heads + 1) * 2.0**-24
        beta = 64 * error  # wide enough for any estimate's error, narrow enough to be cheap
        if (ranking.approximate is None and ranking.approximate_totals is None) or beta > 2.0**-6 or not all(
                ranking.fast_layer(layer) for layer in layers):
            return exact()
        sizes = [layout.lengths[layer] - sink - recent for layer in layers]
        if ranking.approximate_totals is not None:
            pool = ranking.approximate_totals(competing, sink, recent)
        else:
            approx = ranking.approximate()
            totals = []
            for start, stop in layout.groups(competing):
                if not competing[start]:
                    continue
                length = layout.lengths[start]
                rows = layout.rows(approx, start, stop).reshape(stop - start, layout.heads, length)
                totals.append(rows[:, :, sink:length - recent].sum(axis=1).ravel())
            pool = np.concatenate(totals)
        picks = floor - sink - recent  # the best totals of each competing layer its floor takes
        rank = extra + picks * len(layers)  # T is the rank-th largest
        fused = kernels.enabled and pool.dtype == np.float32
        estimate = kernels.largest(pool, rank) if fused else float(np.partition(pool, pool.size - rank)[pool.size - rank])
        if not 2.0**-90 <= estimate < 2.0**100:
            return exact()
        high, low = np.float64(estimate * (1 + beta)), np.float64(estimate * (1 - beta))
        starts = np.cumsum([0] + sizes[:-1])
        if fused:  # the same counts and indices in one pass
            above_per_layer, band = kernels.band(pool, starts, low, high)
        else:
            above = pool > high
            above_per_layer = np.add.reduceat(above, starts, dtype=np.int64)
            band = np.flatnonzero((pool >= low) & ~above)
        in_layer = np.searchsorted(starts, band, side="right") - 1
        if ranking.exact_totals is not None:
            values = ranking.exact_totals(np.asarray(layers)[in_layer], band - starts[in_layer], sink, recent)
        else:
            values = np.empty(band.size, np.float64)
            for index in np.unique(in_layer):
                layer = layers[index]
                length = layout.lengths[layer]
                mine = in_layer == index
                # allocate()'s own sum, so the value is bit for bit the one it would rank.
                exact_totals = ranking.exact_layer(layer)[:, sink:length - recent].sum(axis=0, dtype=np.float64)
                values[mine] = exact_totals[band[mine] - starts[index]]
        position = rank - int(above_per_layer.sum())  # T's rank among the band's exact totals
        if not 1 <= position <= band.size:
            return exact()
        threshold = np.sort(values)[::-1][position - 1]
        # Outside the band, totals are certainly above high / (1 + e) or below low / (1 - e).
        if not (low / (1 - error) < threshold < high / (1 + error)) or int(np.count_nonzero(values == threshold)) != 1:
            return exact()
        greater = above_per_layer + np.bincount(in_layer[values > threshold], minlength=len(layers))
        if not bool((greater >= picks).all()):
            return exact()
        counts = greater + np.bincount(in_layer[values == threshold], minlength=len(layers)) - picks
        result = floors.copy()
        result[layers] += counts
        return result.tolist()


@dataclass(frozen=True)
class EpiCache(BudgetAllocator):
    """EpiCache's per-layer budgets (head_budgets.epicache_budgets), fixed at open from a head
    profile's layer sensitivity: `budgets` (one per layer, every head of a layer the same) is
    what the session's settings keep of the profile, so any replica rebuilds the allocator."""

    name = "epicache"
    description = ("EpiCache: per-layer budgets from a profile's layer sensitivity, (1 - normalised key "
                   "similarity) ** 1.1, floor tokens // 4, same total; needs budget.profile")
    budgets: tuple[int, ...] = ()

    def initial_budgets(self, geometry: Geometry) -> list[int]:
        assert len(self.budgets) == geometry.num_layers, "epicache's budgets come from the session's profile"
        return list(self.budgets)


# The allocators the evaluation grid runs (kvevict.evaluation.grid derives its choices from
# these): each needs nothing but BudgetSpec.tokens.
ALLOCATORS: dict[str, type[BudgetAllocator]] = {cls.name: cls for cls in (Uniform, Pyramid, Adaptive)}
# Per-layer allocators that need a head profile (BudgetSpec.profile): a session offers them, the
# grid cannot run them without a profile, so they are kept apart from ALLOCATORS.
PROFILE_ALLOCATORS: dict[str, type[BudgetAllocator]] = {EpiCache.name: EpiCache}
# Per-head allocators (kvevict.cache_manager.head_budgets.HEAD_ALLOCATORS): a per-head session
# (kvevict.cache_manager.per_head) instead of a BudgetAllocator.
PER_HEAD_ALLOCATORS = ("adahead", "global", "lukv")
# Every name BudgetSpec.allocator accepts, in ListPolicies order.
SESSION_ALLOCATORS = (*ALLOCATORS, *PROFILE_ALLOCATORS, *PER_HEAD_ALLOCATORS)


def check_allocator_name(name: str) -> str:
    """The BudgetSpec.allocator name resolved ("" = uniform); InvalidArgument for unknown ones."""
    name = name or Uniform.name
    if name not in SESSION_ALLOCATORS:
        raise InvalidArgument("budget.allocator", f"unknown allocator {name!r}; known: {', '.join(SESSION_ALLOCATORS)}")
    return name


def make_allocator(name: str, tokens: int, sink: int = 0, recent: int = 0, wrapper: str | None = None,
                   budgets: Sequence[int] = ()) -> BudgetAllocator:
    """Builds a per-layer allocator by BudgetSpec name ("" = uniform); InvalidArgument names the field.

    `sink` and `recent` are the session's resolved protected tokens; `wrapper` the policy's
    wrapper name (None: not checked yet, as before the policy is resolved); `budgets` epicache's
    per-layer budgets (from the session's profile).
    """
    if tokens <= 0:
        raise InvalidArgument("budget.tokens", f"must be > 0, got {tokens}")
    name = check_allocator_name(name)
    if name in PER_HEAD_ALLOCATORS:
        raise InvalidArgument("budget.allocator", f"{name} gives every KV head its own budget: a per-head session")
    cls = ALLOCATORS.get(name) or PROFILE_ALLOCATORS[name]
    if cls is EpiCache:
        return EpiCache(tokens, sink=sink, recent=recent, budgets=tuple(int(b) for b in budgets))
    if cls.wrappers is not None and wrapper is not None and wrapper not in cls.wrappers:
        raise InvalidArgument(
            "budget.allocator",
            f"{cls.name} ranks scores across layers and needs wrapper {' or '.join(cls.wrappers)} (output-error "
            f"units); the scores of wrapper {wrapper!r} are not comparable across layers",
        )
    return cls(tokens, sink=sink, recent=recent)
