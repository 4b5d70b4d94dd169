"""Value norm: keep the tokens whose value vectors stand out from the mean cached value.

A control rather than a method: it ignores attention and keys, so a task on which it does well
lets eviction pick the answer-bearing tokens by what they hold alone, not by how they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch, excluded_deviation
from kvevict.cache_manager.statistics import VALUE_DEV_MEAN, StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb

_VALUE_DEV_MEAN = StatisticRequirement(VALUE_DEV_MEAN)


@dataclass(frozen=True)
class ValueNorm(BasePolicy):
    name = "valuenorm"
    description = "||v_j - mean v|| alone (a value-only control: no attention, no keys)"

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return (_VALUE_DEV_MEAN,)

    def score(self, ctx: LayerContext) -> np.ndarray:
        return ctx.statistics[_VALUE_DEV_MEAN]

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        return batch.values[_VALUE_DEV_MEAN]

    def kernel_scoring(self) -> tuple[int, StatisticRequirement, int]:
        return kernels.SOURCE_PLAIN, _VALUE_DEV_MEAN, 1

    def caote_reference(self) -> StatisticRequirement:
        return excluded_deviation(pb.REFERENCE_VALUE_DEVIATION)
