"""Fitting a prompt to a length in tokens, and placing needles at depths in a haystack.

A task builds its prompt from a haystack of `n` units (sentences, words, lines, list entries);
`fit_units` finds the largest `n` whose prompt still has at most `target` tokens of the given
tokenizer (RULER's "grow the haystack until it reaches the length, then back off"), measuring
every candidate, and `check_length` refuses a prompt more than 2% short of the target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")
LENGTH_TOLERANCE = 0.02
# RULER's needle depths: 40 evenly spaced percentages 0..100.
DEPTH_PERCENTS = tuple(int(p) for p in np.round(np.linspace(0, 100, num=40, endpoint=True)))


def token_counter(tokenizer) -> Callable[[str], int]:
    """Tokens the model sees for `text`: the tokenizer's own special tokens (a BOS) included."""
    def count(text: str) -> int:
        return len(tokenizer(text, verbose=False)["input_ids"])
    return count


def fit_units(build: Callable[[int], T], tokens: Callable[[T], int], target: int, limit: int | None = None,
              first: int = 16) -> tuple[int, T, int]:
    """The largest n in [0, limit] with tokens(build(n)) <= target, with its prompt and count.

    Doubles n from `first` until the prompt is too long (or `limit` is reached), then bisects;
    a prompt's length is taken as non-decreasing in n (true up to a token of BPE merging).
    """
    low, low_prompt = 0, build(0)
    low_tokens = tokens(low_prompt)
    if low_tokens > target:
        raise ValueError(f"the smallest prompt (no haystack) already has {low_tokens} tokens, more than the target {target}")
    high = first if limit is None else min(first, limit)
    while True:
        prompt = build(high)
        count = tokens(prompt)
        if count > target:
            break
        low, low_prompt, low_tokens = high, prompt, count
        if limit is not None and high >= limit:
            return low, low_prompt, low_tokens
        high = 2 * high if limit is None else min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        prompt = build(middle)
        count = tokens(prompt)
        if count > target:
            high = middle
        else:
            low, low_prompt, low_tokens = middle, prompt, count
    return low, low_prompt, low_tokens


def check_length(count: int, target: int, what: str) -> None:
    """Refuses a prompt outside [target * (1 - 2%), target] tokens."""
    if not target * (1 - LENGTH_TOLERANCE) <= count <= target:
        raise ValueError(f"{what} has {count} tokens, not within {LENGTH_TOLERANCE:.0%} below the target {target} "
                         f"(the source text is too short or its units too coarse for this length)")


def spread_depth(index: int) -> float:
    """The depth of prompt `index`: RULER's 40 depths in an order that spreads every prefix evenly
    (0, 1, 0.5, 0.25, 0.75, ...), so a prompt's depth does not depend on how many prompts there are."""
    return DEPTH_PERCENTS[_SPREAD_ORDER[index % len(_SPREAD_ORDER)]] / 100


def _spread_order(n: int) -> tuple[int, ...]:
    """Greedy max-min order of 0..n-1: both ends, then each time the point farthest from those
    chosen (the lowest on a tie)."""
    chosen = [0, n - 1]
    while len(chosen) < n:
        distance = np.min(np.abs(np.arange(n)[:, None] - np.asarray(chosen)[None, :]), axis=1)
        chosen.append(int(np.argmax(distance)))
    return tuple(chosen)


_SPREAD_ORDER = _spread_order(len(DEPTH_PERCENTS))


def random_depths(rng: np.random.Generator, count: int, exclude: float | None = None) -> list[float]:
    """`count` distinct RULER depths drawn at random (RULER's `random.sample(DEPTHS, n)`), none equal
    to `exclude`."""
    pool = [p / 100 for p in DEPTH_PERCENTS if exclude is None or p / 100 != exclude]
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def insert_at_depths(segments: Sequence[str], needles: Sequence[tuple[float, str]], joiner: str) -> list[str]:
    """`segments` with each needle inserted as a segment at the boundary between segments nearest
    to `depth` of the joined text's characters (0: before the first, 1: after the last). Needles
    meeting at one boundary keep their order in `needles`."""
    lengths = np.asarray([len(segment) + len(joiner) for segment in segments], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # offsets[i]: where segment i starts
    if len(segments):
        offsets[-1] -= len(joiner)  # the end of the text: no joiner after the last segment
    total = int(offsets[-1])
    boundaries = [int(np.argmin(np.abs(offsets - depth * total))) for depth, _ in needles]
    out: list[str] = []
    order = sorted(range(len(needles)), key=lambda i: (boundaries[i], i))
    position = 0
    for i in order:
        out.extend(segments[position:boundaries[i]])
        position = boundaries[i]
        out.append(needles[i][1])
    out.extend(segments[position:])
    return out
