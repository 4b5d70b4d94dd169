"""StreamingLLM: keep the attention sinks and the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager.policies.base import BasePolicy, LayerContext


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
