"""KeyDiff: keep the keys least similar to the head's mean direction (needs no attention)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager.batch import Layout
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch, excluded_deviation
from kvevict.cache_manager.statistics import KEY_COSINE, StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb

_KEY_COSINE = StatisticRequirement(KEY_COSINE)


@dataclass(frozen=True)
class KeyDiff(BasePolicy):
    name = "keydiff"
    description = "negative cosine of each key with the mean normalised key"
    non_negative_scores = False

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return (_KEY_COSINE,)

    def score(self, ctx: LayerContext) -> np.ndarray:
        return -ctx.statistics[_KEY_COSINE]

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        return -batch.values[_KEY_COSINE]

    def attention_like(self, score: np.ndarray) -> np.ndarray:
        # score = -cos in [-1, 1] -> (1 - cos) / 2 in [0, 1]; clip float16 rounding past +-1.
        return np.clip((1.0 + score) / 2.0, 0.0, None)

    def attention_like_flat(self, score: np.ndarray, layout: Layout) -> np.ndarray:
        return self.attention_like(score)  # elementwise

    def caote_reference(self) -> StatisticRequirement:
        return excluded_deviation(pb.REFERENCE_KEY_DISSIMILARITY)
