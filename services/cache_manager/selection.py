"""Which tokens a layer keeps: the protected ones plus the top-scored others, exactly `budget`
per KV head, in their cache order.

Ties are broken deterministically in favour of the more recent token (higher cache column):
among equal scores the newer token has had less time to collect attention, and it is what a
stable descending sort of the reversed row would pick.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
