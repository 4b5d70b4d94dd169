"""StreamingLLM: keep the attention sinks and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, excluded_deviation
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb


@dataclass(frozen=True)
class Streaming(BasePolicy):
    name = "streaming"
    description = "sinks plus the most recent tokens (score = absolute position)"
    default_sink = 4

    def score(self, ctx: LayerContext) -> np.ndarray:
        return ctx.positions.astype(np.float64)

    def attention_like(self, score: np.ndarray) -> np.ndarray:
        # Shift per head so the oldest cached token weighs 1: positive and monotone.
        return score - score.min(axis=-1, keepdims=True) + 1.0

    def caote_reference(self) -> StatisticRequirement:
        return excluded_deviation(pb.REFERENCE_POSITION)
