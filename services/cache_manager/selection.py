"""Which tokens a layer keeps: the protected ones plus the top-scored others, exactly `budget`
per KV head, in their cache order.

Ties are broken deterministically in favour of the more recent token (higher cache column):
among equal scores the newer token has had less time to collect attention, and it is what a
stable descending sort of the reversed row would pick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import Layout
from kvevict.cache_manager.errors import InvalidArgument


def select_keep(scores: np.ndarray, budget: int, sink: int, recent: int) -> np.ndarray:
    """Keep mask (kv_heads, L): the protected tokens plus the best-scored others, exactly
    `budget` per head. Needs sink + recent < budget. See select_keep_scored."""
    return select_keep_scored(scores, budget, sink, recent)[0]


def select_keep_scored(scores: np.ndarray, budget: int, sink: int, recent: int) -> tuple[np.ndarray, np.ndarray]:
    """The keep mask of select_keep, and the scores of the evicted tokens (kv_heads, L - budget),
    each head's row in no particular order (empty when nothing is evicted): a by-product of the
    partition, so the metrics get them for free.

    Protected: the first `sink` tokens of the sequence and the `recent` most recent ones. Sinks
    are never evicted and kept tokens keep their order, so they always sit in the first `sink`
    columns (absolute positions 0..sink-1 when the sequence starts at 0); the most recent tokens
    are the last columns. Both ends are the same in every head, so only the middle slice is
    ranked, with a partition (O(L)), not a sort.
    """
    heads, length = scores.shape
    keep = np.ones((heads, length), dtype=bool)
    if length <= budget:
        return keep, scores[:, :0]
    free = budget - sink - recent  # slots left for scored tokens
    assert free > 0, "sink + recent < budget is checked at session open"
    middle = scores[:, sink : length - recent]
    # Threshold = free-th largest score of each head; length > budget leaves more than `free` here.
    kth = middle.shape[1] - free
    partitioned = np.partition(middle, kth, axis=-1)
    threshold = partitioned[:, kth : kth + 1]
    above = middle > threshold
    ties = middle == threshold
    still_free = free - np.count_nonzero(above, axis=-1)
    if (np.count_nonzero(ties, axis=-1) == still_free).all():  # usual: no tie straddles the threshold
        chosen = above | ties
    else:
        # Count ties from the end of the row so the most recent ties win.
        ties_from_end = np.cumsum(ties[:, ::-1], axis=-1, dtype=np.int32)[:, ::-1]
        chosen = above | (ties & (ties_from_end <= still_free[:, None]))
    keep[:, sink : length - recent] = chosen
    # The kth smallest scores of each row: what the evicted tokens scored (ties at the threshold
    # are interchangeable, so the values are exact whichever of them were evicted).
    return keep, partitioned[:, :kth]


@dataclass(eq=False)
class Ranking:
    """Every layer's scores of one report as the batched selection and allocation use them.

    `exact(layer)` is the policy's score of a layer, exactly as `Wrapper.score` computes it. The
    fast path reads `keys` instead (None where only the allocator's estimates are given):
    float32, flat in `layout`, >= +0.0 (never NaN) in every layer `fast` marks (None: all),
    ordered within each row like the exact scores wherever two keys differ by more than `slack`
    units in the last place (0: keys are a monotone map of the scores, so only equal keys are
    ambiguous). `approximate()`, where given, estimates the exact
    scores, flat, within a relative error of `approx_error` in the layers `fast` marks: what the
    adaptive allocator decides from (budgets.Adaptive.allocate_flat), exactly.
    `approximate_totals(competing, sink, recent)`, where given, is what the allocator sums from
    approximate(): per competing layer, the float32 sum over heads of each middle token's
    estimate, the layers one after the other (kernels.head_totals, without the flat estimates).
    """

    layout: Layout
    exact: Callable[[int], np.ndarray]
    keys: np.ndarray | None = None
    fast: Sequence[bool] | None = None
    slack: int = 0
    approximate: Callable[[], np.ndarray] | None = None
    approx_error: float = 0.0
    approximate_totals: Callable[[Sequence[bool], int, int], np.ndarray] | None = None
    # (layers, columns, sink, recent) -> float64 exact_layer(layers[i])[:, sink:length - recent]
    # .sum(axis=0)[columns[i]] for each i (grouped by layer), without every token's exact score
    # (the adaptive allocator's band).
    exact_totals: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray] | None = None
    _exact: dict[int, np.ndarray] = field(default_factory=dict)

    def exact_layer(self, layer: int) -> np.ndarray:
        """exact(layer), computed once."""
        if layer not in self._exact:
            self._exact[layer] = self.exact(layer)
        return self._exact[layer]

    def fast_layer(self, layer: int) -> bool:
        """Whether the keys (or, without keys, the estimates) hold in `layer` (see `fast`)."""
        usable = self.keys is not None or self.approximate_totals is not None
        return usable and (self.fast is None or bool(self.fast[layer]))


# Keys below this are too close to float32's subnormals for `slack` ulps to bound their error;
# at or above the other, too close to infinity (float32 bit patterns).
_SMALLEST_KEY_BITS = np.uint32(0x0D800000)  # 2**-100
_LARGEST_KEY_BITS = np.uint32(0x72800000)  # 2**102


def select_keep_flat(ranking: Ranking, budgets: Sequence[int], sink: int, recent: int) -> np.ndarray:
    """select_keep of every layer at once: the keep masks of all layers, flat in the ranking's
    layout (all True in the layers within their budget), equal to select_keep layer by layer on
    the exact scores.

    Each group of consecutive layers of one shape is partitioned once on the ranking's float32
    keys read as uint32 (the bit patterns of non-negative floats order like their values, and a
    uint32 partition is half the work of a float64 one): the threshold, the largest key below
    it and the smallest above. Where, in every row, both neighbours differ from the threshold by more than the
    keys' slack, the keys and the exact scores put the same tokens above and below it, so the
    kept set is exactly the top `budget - sink - recent` by score. A layer where some row has a
    neighbour that close (a tie, or scores the keys cannot tell apart), or that the ranking
    leaves to the exact scores, is selected by select_keep on its exact scores. With the
    compiled kernels, one call finds every marked row's threshold and neighbours the same
    (kernels.select, without a partition's copy).
    """
    layout = ranking.layout
    keep = np.ones(layout.size, dtype=bool)
    evicting = [length > budget for length, budget in zip(layout.lengths, budgets)]
    marks = [bool(evicting[layer]) and ranking.fast_layer(layer) and (layout.lengths[layer], budgets[layer])
             for layer in range(len(budgets))]
    exact = [layer for layer in range(len(budgets)) if evicting[layer] and not marks[layer]]
    if ranking.keys is not None and kernels.enabled and ranking.keys.dtype == np.float32:
        marked = np.fromiter((bool(mark) for mark in marks), dtype=np.bool_, count=len(marks))
        if marked.any():
            clear = kernels.select(ranking.keys, layout.offsets_array, layout.lengths_array, layout.heads,
                                   np.asarray(budgets, np.intp), marked, sink, recent, ranking.slack, keep)
            exact += [layer for layer in np.flatnonzero(marked & ~clear).tolist()]
    elif ranking.keys is not None:
        keys = ranking.keys.view(np.uint32)
        slack = np.uint32(ranking.slack)
        for start, stop in layout.groups(marks):
            if not marks[start]:
                continue
            length, budget = marks[start]
            middle = layout.rows(keys, start, stop)[:, sink:length - recent]
            kth = middle.shape[1] - (budget - sink - recent)  # evicted per row, > 0
            # One kth: numpy's SIMD partition takes a single one (a list is ~12x slower).
            partitioned = np.partition(middle, kth, axis=-1)
            threshold = partitioned[:, kth]
            clear = np.ones(threshold.shape, dtype=bool)
            if slack:  # the keys' error is relative: keep away from subnormals and infinity
                clear &= (threshold >= _SMALLEST_KEY_BITS) & (threshold < _LARGEST_KEY_BITS)
            # The largest evicted key and the smallest other kept key, clear of the threshold.
            clear &= partitioned[:, :kth].max(axis=-1) + slack < threshold
            if kth + 1 < middle.shape[1]:
                clear &= partitioned[:, kth + 1:].min(axis=-1) > threshold + slack
            np.greater_equal(middle, threshold[:, None], out=layout.rows(keep, start, stop)[:, sink:length - recent])
            if not clear.all():
                exact += sorted({start + int(row) // layout.heads for row in np.flatnonzero(~clear)})
    for layer in sorted(exact):
        layout.layer(keep, layer)[...] = select_keep(ranking.exact_layer(layer), budgets[layer], sink, recent)
    return keep


def validate_protection(sink: int, recent: int, budgets: Sequence[int]) -> None:
    """Protected tokens must leave room for at least one scored token in every layer."""
    smallest = min(budgets)
    if sink >= smallest:
        raise InvalidArgument("policy.sink_tokens", f"{sink} sink tokens need a budget above {sink}, smallest layer budget is {smallest}")
    if sink + recent >= smallest:
        raise InvalidArgument(
            "policy.recent_tokens",
            f"sink {sink} + recent {recent} tokens must be below every layer budget, smallest is {smallest}",
        )
