"""Wrappers over any base policy: none, CAOTE and FastCAOTE (arXiv 2504.14051).

CAOTE turns a base score into the norm of the attention-output change caused by evicting each
token alone: a = h / sum(h) plays the attention of a virtual query with output o, and
caote_j = a_j / (1 - a_j) * ||v_j - o|| = a_j * ||v_j - o_{-j}||, o_{-j} the output without j.
The worker sends ||v_j - o_{-j}|| (VALUE_DEV_EXCLUDED, weights = the base's reference), so the
score needs no 1 - a_j, which rounds to 0 for a sink holding nearly all the mass.
FastCAOTE: a_j / (1 - a_j) * ||v_j - mean v||.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import Layout
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, ReportBatch
from kvevict.cache_manager.selection import Ranking
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


def caote_totals(attention: np.ndarray, excluded_deviation: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """caote_scores(attention, excluded_deviation) summed over the rows, at `columns` only:
    exactly caote_scores(...)[:, columns_range].sum(axis=0) where numpy sums a 2-D array's
    columns row after row (as the adaptive allocator's totals are summed), for a few columns
    without scoring every token. Each score needs only its own weight, its row's float64 sum
    (the same pairwise sum of the same row) and its deviation."""
    a = np.array(attention, dtype=np.float64)
    total = a.sum(axis=-1, keepdims=True)
    picked = a[:, columns]
    empty = total[..., 0] <= 0
    if empty.any():
        picked[empty] = 1.0
        total[empty] = max(a.shape[-1], 1)
    picked /= total
    full = picked >= 1.0
    picked *= excluded_deviation[:, columns]
    if full.any():
        picked[full] = np.inf
    summed = picked[0].copy()
    for row in picked[1:]:
        summed += row
    return summed


def fast_caote_scores(attention: np.ndarray, mean_deviation: np.ndarray) -> np.ndarray:
    """FastCAOTE score per token, float64: a_j / (1 - a_j) * ||v_j - mean v||; +inf where a_j = 1."""
    return _fast_caote_of(normalised_attention(attention), mean_deviation)


def normalised_attention_flat(attention: np.ndarray, layout: Layout) -> np.ndarray:
    """normalised_attention of every layer at once (flat in `layout`), equal to it layer by layer:
    each row's sum is the same pairwise float64 sum over the same contiguous row."""
    a = np.array(attention, dtype=np.float64)
    for _, _, rows in layout.grouped_rows(a):
        total = rows.sum(axis=-1, keepdims=True)
        empty = total[..., 0] <= 0
        if empty.any():
            rows[empty] = 1.0
            total[empty] = max(rows.shape[-1], 1)
        rows /= total
    return a


def caote_scores_flat(attention: np.ndarray, excluded_deviation: np.ndarray, layout: Layout) -> np.ndarray:
    """caote_scores of every layer at once (flat in `layout`), equal to it element for element."""
    a = normalised_attention_flat(attention, layout)
    any_full = bool(a.size) and bool(a.max() >= 1.0)
    full = a >= 1.0 if any_full else None
    a *= excluded_deviation
    if full is not None:
        a[full] = np.inf
    return a


def fast_caote_scores_flat(attention: np.ndarray, mean_deviation: np.ndarray, layout: Layout) -> np.ndarray:
    """fast_caote_scores of every layer at once (flat in `layout`), equal to it element for element."""
    return _fast_caote_of(normalised_attention_flat(attention, layout), mean_deviation)


def _fast_caote_of(a: np.ndarray, mean_deviation: np.ndarray) -> np.ndarray:
    """a / (1 - a) * deviation in place over normalised attention `a`; +inf where a = 1 (also
    where the deviation is 0, not NaN)."""
    rest = 1.0 - a
    full = rest <= 0
    any_full = bool(full.any())
    if any_full:
        rest[full] = 1.0
    a /= rest
    a *= mean_deviation
    if any_full:
        a[full] = np.inf
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

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        """`score` of every layer at once, flat in `batch.layout`, equal to it element for element."""
        return self.base.score_flat(batch)

    def kernel_scoring(self) -> kernels.Scoring | None:
        """How the fused decision kernel scores and ranks a row (kernels.Scoring) with the
        base's kernel source and this wrapper's keys, or None where either has none. Here: the
        base's scores are the keys (non-negative float32 scores order like their bits)."""
        source = self.base.kernel_scoring()
        if source is None or not self.base.non_negative_scores:
            return None
        return kernels.Scoring(source[0], source[2], kernels.KEYS_SCORE, 0)

    def kernel_statistics(self) -> tuple[StatisticRequirement, StatisticRequirement | None]:
        """The statistics kernel_scoring() reads: the base's, and the deviation keys need (None)."""
        return self.base.kernel_scoring()[1], None

    def score_rows(self, rows: np.ndarray, deviation: np.ndarray | None) -> np.ndarray:
        """`score` of a layer from the base's score rows, as kernel_scoring() computes them (and,
        for CAOTE, the layer's deviation statistic)."""
        return rows

    @property
    def non_negative_scores(self) -> bool:
        """Scores are >= 0 (never NaN) for valid statistics (see BasePolicy.non_negative_scores)."""
        return self.base.non_negative_scores

    def rank_flat(self, batch: ReportBatch, ordered: bool) -> Ranking:
        """The scores of every layer as selection and allocation read them (selection.Ranking).
        `ordered`: the statistics passed the bulk check (no -0.0 where they are >= 0), so
        non-negative scores order like their float32 bit patterns."""
        layout = batch.layout
        scores = self.score_flat(batch)
        keys = None
        if ordered and self.non_negative_scores:
            # float32 scores are their own keys; rounding float64 ones to float32 is monotone.
            keys = scores if scores.dtype == np.float32 else scores.astype(np.float32)
        return Ranking(layout, lambda layer: layout.layer(scores, layer), keys,
                       approximate=None if keys is None else lambda: keys,
                       approx_error=0.0 if scores.dtype == np.float32 else 2.0**-24)


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

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        attention = self.base.attention_like_flat(self.base.score_flat(batch), batch.layout)
        return caote_scores_flat(attention, batch.values[self.value_dev_statistic()], batch.layout)

    @property
    def non_negative_scores(self) -> bool:
        return True  # a_j >= 0 times a norm, or +inf

    def kernel_scoring(self) -> kernels.Scoring | None:
        """CAOTE's keys (attention x deviation, slack 8: see rank_flat) where the base's score is
        its attention (attention_like the identity)."""
        source = self.base.kernel_scoring()
        if source is None or type(self.base).attention_like is not BasePolicy.attention_like:
            return None
        return kernels.Scoring(source[0], source[2], kernels.KEYS_CAOTE, 8)

    def kernel_statistics(self) -> tuple[StatisticRequirement, StatisticRequirement | None]:
        return self.base.kernel_scoring()[1], self.value_dev_statistic()

    def score_rows(self, rows: np.ndarray, deviation: np.ndarray | None) -> np.ndarray:
        return caote_scores(rows, deviation)  # score(), the base's attention_like being the identity

    def rank_flat(self, batch: ReportBatch, ordered: bool) -> Ranking:
        """CAOTE's ranking without computing the float64 scores of every token.

        Within a row, caote_j = fl(fl(h_j / S) * d_j) (S the row's float64 sum) orders like the
        exact product h_j * d_j, to a relative 2**-51; the keys are that product rounded to
        float32 (relative error 2**-24), so keys more than 8 units in the last place apart order
        like the scores (slack 8). That holds in rows where no token holds (nearly) all the
        weight: there caote is +inf, or the row sums to 0 and the weights are uniform; a layer
        with such a row (the row's sum within 2**-16 of its largest weight) is ranked by its exact
        scores. The float64 scores of a layer are computed only where needed: by the exact
        selection of such a layer or of a tied row, by the adaptive allocator near its threshold,
        and for the metrics' evicted errors.
        """
        layout = batch.layout
        attention = self.base.attention_like_flat(self.base.score_flat(batch), layout)
        deviation = batch.values[self.value_dev_statistic()]

        def exact(layer: int) -> np.ndarray:
            return caote_scores(layout.layer(attention, layer), layout.layer(deviation, layer))

        if not ordered:
            return Ranking(layout, exact)
        if kernels.enabled and attention.dtype == np.float32:
            # One pass per row: the keys, float64 row sums and the same guard (kernels.caote_keys).
            keys, sums, spread = kernels.caote_keys(attention, deviation, layout.offsets_array, layout.lengths_array,
                                                    layout.heads)
            return caote_ranking(layout, exact, keys, sums, spread)
        keys = np.multiply(attention, deviation, out=np.empty(layout.size, np.float32), casting="same_kind")
        sums = np.empty(len(layout.lengths) * layout.heads, np.float64)
        fast = [False] * len(layout.lengths)
        for start, stop, rows in layout.grouped_rows(attention):
            # Approximate sums, only compared with a margin and used to scale `approximate`:
            # float32's pairwise sum is within (16 + log2 length) 2**-24 of the exact one.
            row_sums = rows.sum(axis=-1)
            sums[start * layout.heads:stop * layout.heads] = row_sums
            spread = row_sums > rows.max(axis=-1) * (1.0 + 2.0**-16)
            for layer in range(start, stop):
                fast[layer] = bool(spread[(layer - start) * layout.heads:(layer - start + 1) * layout.heads].all())

        inverse = _inverse(sums)
        return Ranking(layout, exact, keys, fast, slack=8, approximate=lambda: _scaled(keys, inverse, layout),
                       approx_error=3 * 2.0**-24 + _sum_error(layout))


def caote_ranking(layout: Layout, exact: Callable[[int], np.ndarray], keys: np.ndarray | None, sums: np.ndarray,
                  spread: np.ndarray, totals: tuple[np.ndarray, int, int] | None = None) -> Ranking:
    """CAOTE.rank_flat's Ranking from the kernels' keys, float64 row sums and guards (per row,
    layer-major: kernels.caote_keys, kernels.totals): a layer is fast where every row's guard
    holds. The adaptive allocator's totals come from the keys scaled by 1 / S in one pass, or
    are given: (every layer's totals, one after the other, and the sink and recent they leave
    out), as kernels.totals computes them without keeping the keys."""
    fast = spread.reshape(len(layout.lengths), layout.heads).all(axis=-1).tolist()
    if totals is not None:
        every, sink, recent = totals
        widths = np.maximum(np.asarray(layout.lengths) - sink - recent, 0)  # as kernels.totals lays them out
        starts = np.concatenate([[0], np.cumsum(widths)])

        def given(competing: Sequence[bool], asked_sink: int, asked_recent: int) -> np.ndarray:
            assert (asked_sink, asked_recent) == (sink, recent), "totals were computed for other protected tokens"
            if all(competing):
                return every
            return np.concatenate([every[starts[layer]:starts[layer + 1]] for layer, c in enumerate(competing) if c])

        return Ranking(layout, exact, None, fast, slack=8, approx_error=3 * 2.0**-24 + _float64_sum_error(layout) + 2.0**-40,
                       approximate_totals=given)
    inverse = _inverse(sums)
    return Ranking(layout, exact, keys, fast, slack=8, approximate=lambda: _scaled(keys, inverse, layout),
                   approx_error=3 * 2.0**-24 + _float64_sum_error(layout) + 2.0**-40,
                   approximate_totals=lambda competing, sink, recent: kernels.head_totals(
                       keys, inverse, layout.offsets_array, layout.lengths_array, layout.heads,
                       np.asarray(competing, np.bool_), sink, recent))


def _inverse(sums: np.ndarray) -> np.ndarray:
    """float32 1 / S per row (inf for a row of zeros: such rows are never `fast`)."""
    with np.errstate(divide="ignore"):
        return (1.0 / sums).astype(np.float32)


def _scaled(keys: np.ndarray, inverse: np.ndarray, layout: Layout) -> np.ndarray:
    """CAOTE's estimated scores: keys / S per row, `inverse` = float32 1 / S. Errors: the keys'
    rounding, S's sum, 1 / S and the product (each 2**-24, S's see _sum_error)."""
    scaled = np.empty(layout.size, np.float32)
    for start, stop, rows in layout.grouped_rows(keys):
        np.multiply(rows, inverse[start * layout.heads:stop * layout.heads, None], out=layout.rows(scaled, start, stop))
    return scaled


def _float64_sum_error(layout: Layout) -> float:
    """Relative error bound of a row's attention sum in float64, in any order (the kernels'):
    (length - 1) 2**-53, taken as length 2**-52 (2**-40 more covers the roundings' products)."""
    return max(layout.lengths, default=1) * 2.0**-52


def _sum_error(layout: Layout) -> float:
    """Relative error bound of a row's attention sum: float32's pairwise sum is within (16 +
    log2 length) 2**-24 of the exact one (the kernels' float64 sum far within it)."""
    longest = max(layout.lengths, default=1)
    return (16 + math.ceil(math.log2(max(longest, 2)))) * 2.0**-24


@dataclass(frozen=True)
class FastCAOTE(CAOTE):
    name = "fastcaote"
    description = "CAOTE with the mean cached value as reference output"

    def value_dev_statistic(self) -> StatisticRequirement:
        return StatisticRequirement(VALUE_DEV_MEAN)

    def score(self, ctx: LayerContext) -> np.ndarray:
        attention = self.base.attention_like(self.base.score(ctx))
        return fast_caote_scores(attention, ctx.statistics[self.value_dev_statistic()])

    def score_flat(self, batch: ReportBatch) -> np.ndarray:
        attention = self.base.attention_like_flat(self.base.score_flat(batch), batch.layout)
        return fast_caote_scores_flat(attention, batch.values[self.value_dev_statistic()], batch.layout)

    def rank_flat(self, batch: ReportBatch, ordered: bool) -> Ranking:
        return Wrapper.rank_flat(self, batch, ordered)  # float64 scores, float32 keys (monotone)

    def kernel_scoring(self) -> None:
        return None  # float64 scores a_j / (1 - a_j) x deviation: no float32 keys in the kernel


WRAPPERS: dict[str, type[Wrapper]] = {cls.name: cls for cls in (NoWrapper, CAOTE, FastCAOTE)}


def make_policy(base: BasePolicy, wrapper: str) -> Wrapper:
    """Wraps `base` by the PolicySpec.wrapper name ("" = none); InvalidArgument on `policy.wrapper`."""
    try:
        cls = WRAPPERS[wrapper or NoWrapper.name]
    except KeyError:
        raise InvalidArgument("policy.wrapper", f"unknown wrapper {wrapper!r}; known: {', '.join(WRAPPERS)}") from None
    return cls(base)
