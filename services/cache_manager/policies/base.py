"""What every base policy is: a pure function of one layer's statistics (and its state) to a
score per cached token, shape (kv_heads, tokens), higher = keep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from kvevict.cache_manager.batch import Layout, joined
from kvevict.cache_manager.statistics import VALUE_DEV_EXCLUDED, StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb


@dataclass(frozen=True)
class LayerContext:
    """Everything a policy may look at for one layer of one report.

    Arrays have shape (kv_heads, cache_length) and cover every cached token, the new ones included.
    """

    layer: int
    sequence: int
    positions: np.ndarray  # absolute positions, int
    statistics: Mapping[StatisticRequirement, np.ndarray]  # float32
    accumulator: np.ndarray | None = None  # float32, this report already added (accumulating policies)


@dataclass(frozen=True, eq=False)
class ReportBatch:
    """Every layer of one report at once, flat in `layout` (kvevict.cache_manager.batch): what
    the batched decision path hands the policies. `contexts` are the same data per layer."""

    layout: Layout
    sequence: int
    # Per layer (kv_heads, tracked) int32: the cached tokens' positions before this report.
    tracked_positions: Sequence[np.ndarray]
    new_positions: np.ndarray  # (new_tokens,) int32: every KV head caches them at its row's end
    values: Mapping[StatisticRequirement, np.ndarray]  # float32
    accumulator: np.ndarray | None = None  # float32, this report already added (accumulating policies)

    @cached_property
    def positions(self) -> np.ndarray:
        """int32 absolute positions of every cached token, new ones included, flat in `layout`
        (built when first asked: most policies never look at positions)."""
        layout = self.layout
        positions = np.empty(layout.size, dtype=np.int32)
        tracked = [p.shape[1] for p in self.tracked_positions]
        for start, stop, rows in layout.grouped_rows(positions, tracked):
            old = tracked[start]
            if old:
                rows[:, :old] = joined(self.tracked_positions[start:stop])
            rows[:, old:] = self.new_positions
        return positions

    @cached_property
    def contexts(self) -> list[LayerContext]:
        layout = self.layout
        positions = layout.layers(self.positions)
        values = {req: layout.layers(flat) for req, flat in self.values.items()}
        accumulators = layout.layers(self.accumulator) if self.accumulator is not None else None
        return [LayerContext(layer, self.sequence, positions[layer], {req: v[layer] for req, v in values.items()},
                             None if accumulators is None else accumulators[layer])
                for layer in range(len(layout.lengths))]


@dataclass(frozen=True)
class BasePolicy(ABC):
    """A base eviction policy (kvpress' ScorerPress shape: options as fields, one scoring method)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # True when the score depends on every report (H2O): the worker must then report every block.
    accumulates: ClassVar[bool] = False
    # Sink tokens protected when the request leaves sink_tokens unset.
    default_sink: ClassVar[int] = 0
    # True when every score is >= 0 (no NaN) for valid statistics: selection may then rank the
    # scores by their bit patterns (kvevict.cache_manager.selection.select_keep_flat).
    non_negative_scores: ClassVar[bool] = True

    @classmethod
    def from_options(cls, *, window: int = 0, pool_kernel: int = 0, seed: int = 0) -> BasePolicy:
        """Builds the policy from PolicySpec's options (0 = default); ignores options it lacks."""
        return cls()

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return ()

    def default_recent(self, budget: int) -> int:
        """Recent tokens protected when the request leaves recent_tokens unset."""
        return 0

    @abstractmethod
    def score(self, ctx: LayerContext) -> np.ndarray:
        """Score per cached token, (kv_heads, cache_length); higher = keep."""

    def attention_like(self, score: np.ndarray) -> np.ndarray:
        """A non-negative, monotone transform of `score` that CAOTE normalises into attention."""
        return score

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        """`score` of every layer at once, flat in `batch.layout` (the batched decision path).
        This default scores layer by layer; policies whose score is elementwise or per row
        override it with one computation over all layers, equal to `score` element for element."""
        scores = [self.score(ctx) for ctx in batch.contexts]
        return np.concatenate([score.ravel() for score in scores]) if scores else np.zeros(0)

    def attention_like_flat(self, score: np.ndarray, layout: Layout) -> np.ndarray:
        """`attention_like` of a flat score (as from score_flat), equal to it layer by layer."""
        if type(self).attention_like is BasePolicy.attention_like:
            return score
        return np.concatenate([self.attention_like(layer).ravel() for layer in layout.layers(score)])

    def accumulate_flat(self, previous: Sequence[np.ndarray], values: Mapping[StatisticRequirement, np.ndarray],
                        layout: Layout) -> np.ndarray:
        """`accumulate` of every layer at once: the new accumulators, flat in `layout`. `values`
        are the report's own decoded buffers: an override may turn one into the result in place
        (no other reader follows)."""
        statistics = {req: layout.layers(flat) for req, flat in values.items()}
        return np.concatenate([
            self.accumulate(previous[layer], {req: v[layer] for req, v in statistics.items()}).ravel()
            for layer in range(len(layout.lengths))])

    @abstractmethod
    def caote_reference(self) -> StatisticRequirement:
        """The VALUE_DEV_EXCLUDED statistic whose reference weights are this policy's
        attention_like(score), computed by the worker (see `excluded_deviation`)."""

    def accumulate(self, previous: np.ndarray, statistics: Mapping[StatisticRequirement, np.ndarray]) -> np.ndarray:
        """New accumulator (kv_heads, cache_length) from the previous one (kv_heads, previous_length)."""
        raise NotImplementedError(f"{self.name} does not accumulate")

    def kernel_scoring(self) -> tuple[int, StatisticRequirement, int] | None:
        """How the fused decision kernel computes `score` (kvevict.cache_manager.kernels): the
        source (SOURCE_PLAIN, SOURCE_ACCUMULATED, SOURCE_POOLED), the statistic it reads and the
        pool kernel (1: none), for a score equal to `score` element for element; None (this
        default) where the kernel has no such source (the batched numpy path decides)."""
        return None

    def options(self) -> dict[str, Any]:
        """The policy's own options and their values (for describe_policies and logs)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def excluded_deviation(reference: int, window: int = 0, pool_kernel: int = 0) -> StatisticRequirement:
    """||v_j - o_{-j}|| for the virtual query whose weights are `reference` (a pb.Reference)."""
    return StatisticRequirement(VALUE_DEV_EXCLUDED, window, reference, pool_kernel)
