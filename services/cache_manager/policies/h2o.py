"""H2O (heavy hitters): keep the tokens with the largest attention accumulated over every query."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import Layout, flat_layers, joined
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch, excluded_deviation
from kvevict.cache_manager.statistics import ATTN_SUM, StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb

_ATTN_SUM = StatisticRequirement(ATTN_SUM)


@dataclass(frozen=True)
class H2O(BasePolicy):
    name = "h2o"
    description = "accumulated attention over every query so far; half heavy hitters, half recent"
    accumulates = True

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return (_ATTN_SUM,)

    def default_recent(self, budget: int) -> int:
        # The paper splits the budget evenly between heavy hitters and the recent window.
        return budget // 2

    def accumulate(self, previous: np.ndarray, statistics: Mapping[StatisticRequirement, np.ndarray]) -> np.ndarray:
        # Tokens are appended at the end and kept in order, so old tokens are the leading columns.
        total = np.array(statistics[_ATTN_SUM], dtype=np.float32, copy=True)
        total[:, : previous.shape[1]] += previous
        return total

    def accumulate_flat(self, previous: Sequence[np.ndarray], values: Mapping[StatisticRequirement, np.ndarray],
                        layout: Layout) -> np.ndarray:
        # The decision owns the report's decoded buffers (fresh and writable): the attention
        # becomes the accumulator in place.
        total = values[_ATTN_SUM]
        assert total.dtype == np.float32 and total.flags.writeable
        if kernels.enabled:
            tracked = np.fromiter((p.shape[1] for p in previous), dtype=np.intp, count=len(previous))
            kernels.accumulate(total, layout.offsets_array, layout.lengths_array, layout.heads,
                               flat_layers(previous, np.float32), tracked)
            return total
        for start, stop, rows in layout.grouped_rows(total, [p.shape[1] for p in previous]):
            tracked = previous[start].shape[1]
            if tracked:
                rows[:, :tracked] += joined(previous[start:stop])
        return total

    def score(self, ctx: LayerContext) -> np.ndarray:
        assert ctx.accumulator is not None, "the manager passes the accumulator to accumulating policies"
        return ctx.accumulator

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        assert batch.accumulator is not None, "the manager passes the accumulator to accumulating policies"
        return batch.accumulator

    def kernel_scoring(self) -> tuple[int, StatisticRequirement, int]:
        return kernels.SOURCE_ACCUMULATED, _ATTN_SUM, 1

    def caote_reference(self) -> StatisticRequirement:
        # The worker accumulates the same attention per cached token (kept tokens only, as here).
        return excluded_deviation(pb.REFERENCE_ACCUMULATED_ATTENTION)
