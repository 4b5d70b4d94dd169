"""TOVA with the layer's heads averaged: every KV head keeps the tokens the last query attends to
most on average over all query heads of the layer (TOVA's paper and kvpress's TOVAPress score
this way; `tova` scores each KV head by its own query group)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch
from kvevict.cache_manager.policies.tova import TOVA, last_query_attention


@dataclass(frozen=True)
class TOVAMean(TOVA):
    name = "tova-mean"
    description = "attention of the last query, averaged over the layer's heads (kvpress's TOVAPress)"

    def score(self, ctx: LayerContext) -> np.ndarray:
        # Each KV head's statistic is its group's mean, and groups are equal: their mean is the
        # mean over every query head of the layer.
        attention = last_query_attention(ctx)
        return np.broadcast_to(attention.mean(axis=0, keepdims=True), attention.shape).copy()

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        return BasePolicy.score_flat(self, batch)  # per layer: not TOVA's elementwise score

    def kernel_scoring(self) -> None:
        return None  # a mean over heads: not TOVA's kernel source
