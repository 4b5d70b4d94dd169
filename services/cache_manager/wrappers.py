"""Wrappers over any base policy: none, CAOTE and FastCAOTE (arXiv 2504.14051).

CAOTE turns a base score into the norm of the attention-output change caused by evicting each
token alone: a = h / sum(h) plays the attention of a virtual query with output o, and
caote_j = a_j / (1 - a_j) * ||v_j - o|| = a_j * ||v_j - o_{-j}||, o_{-j} the output without j.
The worker sends ||v_j - o_{-j}|| (VALUE_DEV_EXCLUDED, weights = the base's reference), so the
score needs no 1 - a_j, which rounds to 0 for a sink holding nearly all the mass.
FastCAOTE: a_j / (1 - a_j) * ||v_j - mean v||.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext
from kvevict.cache_manager.statistics import VALUE_DEV_MEAN, StatisticRequirement, merge_requirements


def normalised_attention(attention: np.ndarray) -> np.ndarray:
    """a = h / sum(h) per row along the last axis, float64 (a fresh buffer); a row summing to 0
    is uniform."""
    a = np.array(attention, dtype=np.float64)
    total = a.sum(axis=-1, keepdims=True)
    empty = total[..., 0] <= 0
    if empty.any():
        a[empty] = 1.0
        total[empty] = max(a.shape[-1], 1)
    a /= total
    return a


def caote_scores(attention: np.ndarray, excluded_deviation: np.ndarray) -> np.ndarray:
    """CAOTE score per token along the last axis, float64: a_j * ||v_j - o_{-j}||.

    `attention`: non-negative weights h (any scale), normalised per row (normalised_attention).
    `excluded_deviation`: ||v_j - o_{-j}|| (VALUE_DEV_EXCLUDED). A token holding all the mass
    (every other weight exactly 0) scores +inf: nothing would be left to renormalise.
    """
    a = normalised_attention(attention)
    full = a >= 1.0
    a *= excluded_deviation
    if full.any():
        a[full] = np.inf
    return a


def fast_caote_scores(attention: np.ndarray, mean_deviation: np.ndarray) -> np.ndarray:
    """FastCAOTE score per token, float64: a_j / (1 - a_j) * ||v_j - mean v||; +inf where a_j = 1."""
    a = normalised_attention(attention)
    rest = 1.0 - a
    full = rest <= 0
    any_full = bool(full.any())
    if any_full:
        rest[full] = 1.0
    a /= rest
    a *= mean_deviation
    if any_full:
        a[full] = np.inf  # also where the deviation is 0, not NaN
    return a


@dataclass(frozen=True)
class Wrapper:
    """A policy as the manager runs it: a base policy plus an optional transform of its score."""

    name: ClassVar[str]
    description: ClassVar[str]
    base: BasePolicy

    @property
    def accumulates(self) -> bool:
        return self.base.accumulates

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return self.base.required_statistics()

    def accumulate(self, previous: np.ndarray, statistics: Mapping[StatisticRequirement, np.ndarray]) -> np.ndarray:
        return self.base.accumulate(previous, statistics)

    def score(self, ctx: LayerContext) -> np.ndarray:
        return self.base.score(ctx)


@dataclass(frozen=True)
class NoWrapper(Wrapper):
    name = "none"
    description = "the base score as is"


@dataclass(frozen=True)
class CAOTE(Wrapper):
    name = "caote"
    description = "output error of evicting each token, for the virtual query whose attention is the base score"

    def value_dev_statistic(self) -> StatisticRequirement:
        return self.base.caote_reference()

    def required_statistics(self) -> tuple[StatisticRequirement, ...]:
        return merge_requirements(self.base.required_statistics(), (self.value_dev_statistic(),))

    def score(self, ctx: LayerContext) -> np.ndarray:
        attention = self.base.attention_like(self.base.score(ctx))
        return caote_scores(attention, ctx.statistics[self.value_dev_statistic()])


@dataclass(frozen=True)
class FastCAOTE(CAOTE):
    name = "fastcaote"
    description = "CAOTE with the mean cached value as reference output"

    def value_dev_statistic(self) -> StatisticRequirement:
        return StatisticRequirement(VALUE_DEV_MEAN)

    def score(self, ctx: LayerContext) -> np.ndarray:
        attention = self.base.attention_like(self.base.score(ctx))
        return fast_caote_scores(attention, ctx.statistics[self.value_dev_statistic()])


WRAPPERS: dict[str, type[Wrapper]] = {cls.name: cls for cls in (NoWrapper, CAOTE, FastCAOTE)}


def make_policy(base: BasePolicy, wrapper: str) -> Wrapper:
    """Wraps `base` by the PolicySpec.wrapper name ("" = none); InvalidArgument on `policy.wrapper`."""
    try:
        cls = WRAPPERS[wrapper or NoWrapper.name]
    except KeyError:
        raise InvalidArgument("policy.wrapper", f"unknown wrapper {wrapper!r}; known: {', '.join(WRAPPERS)}") from None
    return cls(base)
