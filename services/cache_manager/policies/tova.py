"""TOVA: keep the tokens the last query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch, excluded_deviation
from kvevict.cache_manager.statistics import ATTN_WINDOW, StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb

_LAST_QUERY = StatisticRequirement(ATTN_WINDOW, 1)


def last_query_attention(ctx: LayerContext) -> np.ndarray:
    """(kv_heads, tokens): the attention of the last query of the report, per KV head."""
    return ctx.statistics[_LAST_QUERY]


@dataclass(frozen=True)
class TOVA(BasePolicy):
    name = "tova"
    description = "attention of the last query"

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return (_LAST_QUERY,)

    def score(self, ctx: LayerContext) -> np.ndarray:
        return last_query_attention(ctx)

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        return batch.values[_LAST_QUERY]

    def kernel_scoring(self) -> tuple[int, StatisticRequirement, int] | None:
        return kernels.SOURCE_PLAIN, _LAST_QUERY, 1

    def caote_reference(self) -> StatisticRequirement:
        # Same single query: CAOTE is then exactly the output change of evicting each token.
        return excluded_deviation(pb.REFERENCE_WINDOW_ATTENTION, window=1, pool_kernel=1)
