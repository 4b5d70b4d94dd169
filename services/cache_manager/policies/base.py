"""What every base policy is: a pure function of one layer's statistics (and its state) to a
score per cached token, shape (kv_heads, tokens), higher = keep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

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


@dataclass(frozen=True)
class BasePolicy(ABC):
    """A base eviction policy (kvpress' ScorerPress shape: options as fields, one scoring method)."""

    name: ClassVar[str]
    description: ClassVar[str]
    # True when the score depends on every report (H2O): the worker must then report every block.
    accumulates: ClassVar[bool] = False
    # Sink tokens protected when the request leaves sink_tokens unset.
    default_sink: ClassVar[int] = 0

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

    @abstractmethod
    def caote_reference(self) -> StatisticRequirement:
        """The VALUE_DEV_EXCLUDED statistic whose reference weights are this policy's
        attention_like(score), computed by the worker (see `excluded_deviation`)."""

    def accumulate(self, previous: np.ndarray, statistics: Mapping[StatisticRequirement, np.ndarray]) -> np.ndarray:
        """New accumulator (kv_heads, cache_length) from the previous one (kv_heads, previous_length)."""
        raise NotImplementedError(f"{self.name} does not accumulate")

    def options(self) -> dict[str, Any]:
        """The policy's own options and their values (for describe_policies and logs)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def excluded_deviation(reference: int, window: int = 0, pool_kernel: int = 0) -> StatisticRequirement:
    """||v_j - o_{-j}|| for the virtual query whose weights are `reference` (a pb.Reference)."""
    return StatisticRequirement(VALUE_DEV_EXCLUDED, window, reference, pool_kernel)
