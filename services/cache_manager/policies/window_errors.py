"""Policies that keep the tokens whose pruning would change the outputs of an observation window
of queries most, each query with its own output (the output-aware family: per-query CAOTE,
OBCache). The worker measures the error per query (STATISTIC_QUERY_*_ERROR,
kvevict.worker.query_errors) and sums it over the window; the score max-pools that sum along
tokens, in SnapKV's shape (window 32, kernel 7: the query set and pooling of the base OBCache
improves), and the window itself is kept, as SnapKV does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext
from kvevict.cache_manager.policies.snapkv import max_pool
from kvevict.cache_manager.statistics import StatisticRequirement

_DEFAULT_WINDOW = 32
_DEFAULT_KERNEL = 7


@dataclass(frozen=True)
class WindowErrorPolicy(BasePolicy):
    """The summed per-query error of `statistic` over the last `window` queries, max-pooled."""

    statistic: ClassVar[int]
    window: int = field(default=_DEFAULT_WINDOW, metadata={"doc": "queries in the observation window"})
    pool_kernel: int = field(default=_DEFAULT_KERNEL, metadata={"doc": "odd max-pool kernel along tokens; 1 = no pooling"})

    @classmethod
    def from_options(cls, *, window: int = 0, pool_kernel: int = 0, seed: int = 0) -> WindowErrorPolicy:
        kernel = pool_kernel or _DEFAULT_KERNEL
        if kernel % 2 == 0:
            raise InvalidArgument("policy.pool_kernel", f"must be odd for a same-size pool, got {kernel}")
        return cls(window=window or _DEFAULT_WINDOW, pool_kernel=kernel)

    @property
    def requirement(self) -> StatisticRequirement:
        return StatisticRequirement(self.statistic, self.window)

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return (self.requirement,)

    def default_recent(self, budget: int) -> int:
        return min(self.window, budget // 2)

    def score(self, ctx: LayerContext) -> np.ndarray:
        return max_pool(ctx.statistics[self.requirement], self.pool_kernel)

    def caote_reference(self) -> StatisticRequirement:
        raise InvalidArgument("policy.wrapper", f"{self.name} scores output errors itself (per query); use it "
                              "without a wrapper")
