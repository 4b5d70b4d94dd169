"""Budgets per (layer, KV head): allocators that give every KV head of every layer its own keep
count, and the keep masks that follow from them. Pure numpy, no transport, no torch.

Four allocators, each returning an int array (layers, heads) of tokens kept per KV head:

* `adahead_budgets` (AdaKV, arXiv 2407.11550): within each layer one top-k over the scores of all
  its KV heads (k = tokens x heads), each head first taking a floor of its own best tokens.
* `global_budgets`: the same top-k across every layer and head (k = tokens x layers x heads);
  only for scores comparable across heads and layers (`check_comparable`).
* `lukv_budgets` (LU-KV, arXiv 2602.08585): the greedy marginal-utility allocation over the
  concave hulls of offline-profiled utility curves (`HeadProfile`, written by `kvevict profile`).
* `epicache_budgets` (EpiCache, arXiv 2509.17396): per-layer budgets proportional to the
  profiled layer sensitivity raised to a power, with a floor; every head of a layer the same.

Every allocator keeps an exact total, respects its floors and breaks ties by a fixed rule (stated
on each). Protected tokens (the first `sink` and the last `recent` of a head's cache) are always
kept and count toward their head's budget. `keep_masks` turns budgets and scores into the kept
set: each head's protected tokens plus its best-scored others up to its budget, among equal
scores the more recent token first (kvevict.cache_manager.selection's rule).

docs/HEAD_BUDGETS.md explains the choices and the profile file format.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from kvevict.cache_manager.errors import InvalidArgument

# AdaKV's safeguard: each head keeps at least alpha x its uniform budget. 0.2 is the value the
# AdaKV authors give for GQA models (their GQA evaluation script: "we suggest setting
# floor_alpha to 0.2 while using gqa"); kvpress's AdaKVPress defaults to the same 0.20.
ADAHEAD_ALPHA = 0.2
# Scores comparable across heads and layers: the CAOTE wrappers' output errors (as the per-layer
# `adaptive` allocator ranks them), LaProx's layer-output units and KVzip's attention
# probabilities (each a share of one query's attention; KVzip ranks them model-wide).
COMPARABLE_WRAPPERS = ("caote", "fastcaote")
COMPARABLE_BASES = ("laprox", "kvzip")
# EpiCache's layer allocation: weights (1 - normalised similarity) ** power; the authors run
# Llama models with power 1.1 (Qwen 1.3), and floor every layer at a quarter of the average.
EPICACHE_POWER = 1.1
EPICACHE_FLOOR_FRACTION = 0.25
PROFILE_FORMAT = "kvevict-head-profile"
PROFILE_VERSION = 1


@dataclass(frozen=True)
class HeadAllocatorInfo:
    """What one allocator needs and which policies' scores it accepts.

    >>> HEAD_ALLOCATORS["global"].comparable_only, HEAD_ALLOCATORS["lukv"].needs_profile
    (True, True)
    """

    name: str
    description: str
    needs_scores: bool  # decides from each report's scores
    needs_profile: bool  # decides from a `kvevict profile` file
    comparable_only: bool  # ranks scores across heads of different layers: comparable units only


HEAD_ALLOCATORS: dict[str, HeadAllocatorInfo] = {info.name: info for info in (
    HeadAllocatorInfo("adahead", "AdaKV: one top-k over all KV heads of a layer, floor round(0.2 x tokens) per head",
                      needs_scores=True, needs_profile=False, comparable_only=False),
    HeadAllocatorInfo("global", "one top-k over every layer and head, floor round(0.2 x tokens) per head; "
                      "caote/fastcaote wrappers, laprox or kvzip only", needs_scores=True, needs_profile=False,
                      comparable_only=True),
    HeadAllocatorInfo("lukv", "LU-KV: greedy marginal utility over profiled per-head curves (concave hulls), "
                      "floor round(0.2 x tokens) per head", needs_scores=False, needs_profile=True,
                      comparable_only=False),
    HeadAllocatorInfo("epicache", "EpiCache: per-layer budgets proportional to (1 - normalised key similarity) "
                      "** 1.1, floor tokens // 4", needs_scores=False, needs_profile=True, comparable_only=False),
)}


def accepts_policy(allocator: str, base: str, wrapper: str) -> bool:
    """Whether `allocator` may rank the scores of policy `wrapper+base` ("" or "none": no wrapper).

    >>> accepts_policy("global", "h2o", "caote"), accepts_policy("global", "h2o", "none")
    (True, False)
    >>> accepts_policy("adahead", "tova", "")
    True
    """
    info = HEAD_ALLOCATORS[allocator]
    return not info.comparable_only or wrapper in COMPARABLE_WRAPPERS or base in COMPARABLE_BASES


def check_comparable(allocator: str, base: str, wrapper: str) -> None:
    """InvalidArgument (field budget.allocator) when `allocator` cannot rank this policy's scores.

    >>> check_comparable("global", "laprox", "none")
    >>> try:
    ...     check_comparable("global", "snapkv", "none")
    ... except InvalidArgument as error:
    ...     print(error.field)
    budget.allocator
    """
    if allocator not in HEAD_ALLOCATORS:
        raise InvalidArgument("budget.allocator", f"unknown head allocator {allocator!r}; known: "
                                                  f"{', '.join(HEAD_ALLOCATORS)}")
    if not accepts_policy(allocator, base, wrapper):
        policy = base if wrapper in ("", "none") else f"{wrapper}+{base}"
        raise InvalidArgument(
            "budget.allocator",
            f"{allocator} ranks scores across every layer and head and needs wrapper "
            f"{' or '.join(COMPARABLE_WRAPPERS)} or base {' or '.join(COMPARABLE_BASES)} "
            f"(units comparable model-wide); "
            f"the scores of policy {policy!r} are not comparable across heads and layers")


def _round_half_up(value: float) -> int:
    # Python's round() rounds halves to even; a floor should not depend on the parity of tokens.
    return int(math.floor(value + 0.5))


def _validate(tokens: int, sink: int, recent: int, alpha: float) -> None:
    if tokens <= 0:
        raise InvalidArgument("budget.tokens", f"must be > 0, got {tokens}")
    if sink < 0 or recent < 0:
        raise InvalidArgument("policy.sink_tokens", f"sink and recent must be >= 0, got {sink} and {recent}")
    if sink + recent >= tokens:
        raise InvalidArgument("policy.recent_tokens",
                              f"sink {sink} + recent {recent} tokens must be below the budget {tokens}")
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument("budget.alpha", f"must be in [0, 1], got {alpha}")


def protected_count(length: int, sink: int, recent: int) -> int:
    """Protected tokens of a head holding `length` tokens (sinks and recent ones may overlap).

    >>> protected_count(100, 4, 8), protected_count(10, 4, 8)
    (12, 10)
    """
    return min(length, sink + recent)


def head_floor(tokens: int, alpha: float, length: int, sink: int = 0, recent: int = 0) -> int:
    """The least a head holding `length` tokens keeps: round(alpha x tokens) (halves up), never
    below its protected tokens, never above `length`.

    >>> head_floor(100, 0.2, 5000), head_floor(100, 0.2, 5000, sink=4, recent=32), head_floor(100, 0.2, 7)
    (20, 36, 7)
    """
    return min(length, max(_round_half_up(alpha * tokens), protected_count(length, sink, recent)))


def _check_scores(scores: Sequence[np.ndarray]) -> int:
    if not scores:
        raise InvalidArgument("layers", "no layers")
    heads = {np.shape(s)[0] for s in scores}
    if len(heads) != 1 or any(np.ndim(s) != 2 for s in scores):
        raise InvalidArgument("layers", "scores must be (kv_heads, tokens) arrays with as many heads in every layer")
    for layer, s in enumerate(scores):
        if np.isnan(s).any():
            raise InvalidArgument(f"layers[{layer}]", "scores hold NaN")
    return heads.pop()


def _middle_ranks(middle: np.ndarray) -> np.ndarray:
    """Rank (0 = best) of each middle token within its head: higher score first, among equal
    scores the more recent (higher column) first."""
    columns = np.broadcast_to(np.arange(middle.shape[1]), middle.shape)
    order = np.lexsort((-columns, -middle), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(middle.shape[1])[None, :], axis=-1)
    return ranks


def _best(value: np.ndarray, count: int, ties: Sequence[np.ndarray]) -> np.ndarray:
    """Mask of the `count` best entries of `value`: higher first, equal values ordered by the
    `ties` keys (most significant first, lower wins). The same set as a full lexsort's first
    `count`, in O(n): a partition finds the count-th largest value and only the entries equal to
    it are sorted."""
    size = value.size
    mask = np.zeros(size, dtype=bool)
    if count <= 0:
        return mask
    if count >= size:
        mask[:] = True
        return mask
    threshold = np.partition(value, size - count)[size - count]
    above = value > threshold
    mask |= above
    tied = np.flatnonzero(value == threshold)
    need = count - int(np.count_nonzero(above))
    if need == tied.size:
        mask[tied] = True
    else:
        order = np.lexsort(tuple(key[tied] for key in reversed(ties)))  # lexsort: the last key leads
        mask[tied[order[:need]]] = True
    return mask


def _check_rows(rows: Sequence[Sequence[np.ndarray]]) -> int:
    """Heads per layer of a ragged cache: per layer, one 1-D score row per KV head."""
    if not rows:
        raise InvalidArgument("layers", "no layers")
    heads = {len(layer) for layer in rows}
    if len(heads) != 1 or any(np.ndim(row) != 1 for layer in rows for row in layer):
        raise InvalidArgument("layers", "scores must be one 1-D row per KV head, as many heads in every layer")
    for layer, heads_rows in enumerate(rows):
        if any(np.isnan(row).any() for row in heads_rows):
            raise InvalidArgument(f"layers[{layer}]", "scores hold NaN")
    return heads.pop()


def _top_k_counts(rows: Sequence[Sequence[np.ndarray]], tokens: int, sink: int, recent: int, alpha: float,
                  groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Floors, then one top-k over the other middle tokens of the layers of each group. `rows`:
    per layer one 1-D score row per KV head, each head its own length (a ragged cache)."""
    heads = _check_rows(rows)
    _validate(tokens, sink, recent, alpha)
    budgets = np.zeros((len(rows), heads), dtype=np.int64)
    for group in groups:
        held = 0
        values, columns, layer_ids, head_ids = [], [], [], []
        for layer in group:
            for head, row in enumerate(rows[layer]):
                n = len(row)
                held += n
                floor = head_floor(tokens, alpha, n, sink, recent)
                budgets[layer, head] = floor
                if n <= sink + recent or floor >= n:
                    continue
                middle = np.asarray(row, dtype=np.float64)[sink:n - recent]
                # A head's floor takes its best middle tokens (ties: the more recent); the rest
                # compete across heads.
                columns_all = np.arange(middle.size)
                column = np.flatnonzero(~_best(middle, floor - protected_count(n, sink, recent), [-columns_all]))
                values.append(middle[column])
                columns.append(column)
                layer_ids.append(np.full(column.size, layer))
                head_ids.append(np.full(column.size, head))
        target = min(len(group) * heads * tokens, held)
        extra = target - int(budgets[list(group)].sum())
        if extra <= 0 or not values:
            continue
        value, column, layer_id, head_id = (np.concatenate(a) for a in (values, columns, layer_ids, head_ids))
        # Higher score first; ties: the more recent column, then the lower layer, then the lower head.
        # (Columns count from each head's first middle token, which is the same offset `sink` in
        # every head, so "more recent" compares cache columns even when the heads' lengths differ.)
        chosen = _best(value, extra, [-column, layer_id, head_id])
        np.add.at(budgets, (layer_id[chosen], head_id[chosen]), 1)
    return budgets


def _rows(scores: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """Rectangular (kv_heads, length) layers as ragged rows (views)."""
    _check_scores(scores)
    return [list(np.asarray(score)) for score in scores]


def adahead_budgets(scores: Sequence[np.ndarray], tokens: int, sink: int = 0, recent: int = 0,
                    alpha: float = ADAHEAD_ALPHA) -> np.ndarray:
    """AdaKV's per-head budgets (layers, heads) from one report's scores, one (kv_heads, length)
    array per layer (higher = keep).

    Each layer keeps min(tokens x heads, heads x length) tokens in all. Every head first gets its
    floor (head_floor: round(alpha x tokens), at least its protected tokens) filled with its own
    protected and best-scored tokens; the rest of the layer's total goes to the highest remaining
    scores of any head of the layer. Ties: the more recent column first, then the lower head.
    This is kvpress's AdaKVPress safeguard (the floor tokens are set to +inf before one top-k).

    >>> scores = [np.array([[9., 8., 7., 6.], [1., 2., 3., 4.]])]
    >>> adahead_budgets(scores, tokens=2, alpha=0.5).tolist()
    [[3, 1]]
    >>> adahead_budgets(scores, tokens=2, alpha=0.0).tolist()
    [[4, 0]]
    """
    return _top_k_counts(_rows(scores), tokens, sink, recent, alpha, [[layer] for layer in range(len(scores))])


def adahead_budgets_ragged(rows: Sequence[Sequence[np.ndarray]], tokens: int, sink: int = 0, recent: int = 0,
                           alpha: float = ADAHEAD_ALPHA) -> np.ndarray:
    """adahead_budgets of a ragged cache: `rows[l][h]` is head h of layer l's 1-D scores, each
    head its own length. Each layer keeps min(tokens x heads, the tokens its heads hold); floors,
    protection (each head's own first `sink` and last `recent`) and ties as adahead_budgets. On
    heads of one length it equals adahead_budgets.

    >>> adahead_budgets_ragged([[np.array([9., 8., 7., 6.]), np.array([5.])]], tokens=2, alpha=0.5).tolist()
    [[3, 1]]
    """
    return _top_k_counts(rows, tokens, sink, recent, alpha, [[layer] for layer in range(len(rows))])


def global_budgets(scores: Sequence[np.ndarray], tokens: int, sink: int = 0, recent: int = 0,
                   alpha: float = ADAHEAD_ALPHA) -> np.ndarray:
    """Per-head budgets (layers, heads) from one top-k across every layer and head.

    The model keeps min(tokens x layers x heads, heads x the sum of the layers' lengths) tokens;
    every head first gets its floor (head_floor), then the highest remaining scores anywhere.
    Ties: the more recent column, then the lower layer, then the lower head. Meaningful only for
    scores comparable across layers: check the policy with `check_comparable("global", ...)`.

    >>> scores = [np.array([[5., 1., 1.]]), np.array([[4., 3., 2.]])]
    >>> global_budgets(scores, tokens=2, alpha=0.5).tolist()
    [[1], [3]]
    """
    return _top_k_counts(_rows(scores), tokens, sink, recent, alpha, [list(range(len(scores)))])


def global_budgets_ragged(rows: Sequence[Sequence[np.ndarray]], tokens: int, sink: int = 0, recent: int = 0,
                          alpha: float = ADAHEAD_ALPHA) -> np.ndarray:
    """global_budgets of a ragged cache (rows as adahead_budgets_ragged): the model keeps
    min(tokens x layers x heads, every token held); equals global_budgets on heads of one length.

    >>> global_budgets_ragged([[np.array([5., 1., 1.])], [np.array([4., 3.])]], tokens=2, alpha=0.5).tolist()
    [[2], [2]]
    """
    return _top_k_counts(rows, tokens, sink, recent, alpha, [list(range(len(rows)))])


def keep_masks(scores: Sequence[np.ndarray], budgets: np.ndarray, sink: int = 0, recent: int = 0) -> list[np.ndarray]:
    """Keep mask (kv_heads, length) per layer: each head's protected tokens plus its best-scored
    others up to its budget (budgets (layers, heads)); among equal scores the more recent token.

    >>> scores = [np.array([[9., 8., 7., 6.], [1., 2., 3., 4.]])]
    >>> keep_masks(scores, np.array([[3, 1]]), sink=0, recent=1)[0].astype(int).tolist()
    [[1, 1, 0, 1], [0, 0, 0, 1]]
    """
    budgets = np.asarray(budgets)
    if budgets.shape != (len(scores), _check_scores(scores)):
        raise InvalidArgument("budgets", f"shape {budgets.shape} does not match {len(scores)} layers of "
                                         f"{np.shape(scores[0])[0]} heads")
    masks = []
    for layer, score in enumerate(scores):
        heads, length = score.shape
        protected = np.zeros(length, dtype=bool)
        protected[:sink] = True
        protected[max(length - recent, 0):] = True
        free = np.minimum(budgets[layer], length) - protected_count(length, sink, recent)
        if (free < 0).any():
            raise InvalidArgument(f"budgets[{layer}]", "a head's budget is below its protected tokens")
        keep = np.broadcast_to(protected, (heads, length)).copy()
        if length > sink + recent:
            middle = np.asarray(score, dtype=np.float64)[:, sink:length - recent]
            keep[:, sink:length - recent] = _middle_ranks(middle) < free[:, None]
        masks.append(keep)
    return masks


def keep_masks_ragged(rows: Sequence[Sequence[np.ndarray]], budgets: np.ndarray, sink: int = 0,
                      recent: int = 0) -> list[list[np.ndarray]]:
    """keep_masks of a ragged cache: per layer, one 1-D keep mask per head (rows as
    adahead_budgets_ragged), each head's own protected tokens plus its best others up to its
    budget; among equal scores the more recent token.

    >>> [m.astype(int).tolist() for m in keep_masks_ragged([[np.array([9., 8., 7.]), np.array([1., 2.])]],
    ...                                                     np.array([[2, 1]]), recent=1)[0]]
    [[1, 0, 1], [0, 1]]
    """
    heads = _check_rows(rows)
    budgets = np.asarray(budgets)
    if budgets.shape != (len(rows), heads):
        raise InvalidArgument("budgets", f"shape {budgets.shape} does not match {len(rows)} layers of {heads} heads")
    masks = []
    for layer, heads_rows in enumerate(rows):
        layer_masks = []
        for head, row in enumerate(heads_rows):
            length = len(row)
            free = min(int(budgets[layer, head]), length) - protected_count(length, sink, recent)
            if free < 0:
                raise InvalidArgument(f"budgets[{layer}]", "a head's budget is below its protected tokens")
            keep = np.zeros(length, dtype=bool)
            keep[:sink] = True
            keep[max(length - recent, 0):] = True
            if length > sink + recent:
                middle = np.asarray(row, dtype=np.float64)[sink:length - recent]
                keep[sink:length - recent] = _best(middle, free, [-np.arange(middle.size)])
            layer_masks.append(keep)
        masks.append(layer_masks)
    return masks


# --- LU-KV ---------------------------------------------------------------------------------------


def concave_hull(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """LU-KV's convex-hull relaxation of utility curves sampled on `grid` (increasing), along the
    last axis: the least concave majorant, with slopes clipped at 0 (utility never decreases).

    Its slopes are the weighted antitonic regression (pool-adjacent-violators, weights = grid
    spacing) of the curve's slopes, as the paper's PAVA on marginal decrements.

    >>> concave_hull(np.array([0., 1., 2., 3.]), np.array([0., 1., 1., 4.])).tolist()
    [0.0, 1.3333333333333333, 2.6666666666666665, 4.0]
    """
    grid = np.asarray(grid, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    widths = np.diff(grid)
    slopes = np.diff(values, axis=-1) / widths
    flat = slopes.reshape(-1, slopes.shape[-1])
    fitted = np.empty_like(flat)
    for row, source in zip(fitted, flat):
        # Blocks of (mean slope, weight, count); merge while a later block is steeper.
        means, weights, counts = [], [], []
        for slope, width in zip(source, widths):
            means.append(slope)
            weights.append(width)
            counts.append(1)
            while len(means) > 1 and means[-2] < means[-1]:
                weight = weights[-2] + weights[-1]
                mean = (means[-2] * weights[-2] + means[-1] * weights[-1]) / weight
                count = counts[-2] + counts[-1]
                del means[-1], weights[-1], counts[-1]
                means[-1], weights[-1], counts[-1] = mean, weight, count
        row[:] = np.repeat(means, counts)
    fitted = np.maximum(fitted, 0.0).reshape(slopes.shape)
    hull = np.concatenate([values[..., :1], values[..., :1] + np.cumsum(fitted * widths, axis=-1)], axis=-1)
    return hull


def _lengths_array(lengths: int | Sequence[int] | np.ndarray, layers: int, heads: int) -> np.ndarray:
    array = np.asarray(lengths, dtype=np.int64)
    if array.ndim == 1:
        array = array[:, None]
    try:
        array = np.broadcast_to(array, (layers, heads))
    except ValueError:
        raise InvalidArgument("cache_lengths", f"shape {np.shape(lengths)} does not match {layers} layers of "
                                               f"{heads} heads") from None
    if (array < 0).any():
        raise InvalidArgument("cache_lengths", "must be >= 0")
    return array


def lukv_gains(curves: np.ndarray, grid: np.ndarray, lengths: int | Sequence[int] | np.ndarray,
               hull: np.ndarray | None = None) -> list[np.ndarray]:
    """Marginal utility of each kept token, per (layer, head) flat in row-major order: entry b-1 of
    head (l, h) is what its b-th token adds, U(b / n) - U((b - 1) / n) on the head's concave hull
    U (linear between grid points), n its length. Non-increasing in b (the hull is concave; the
    running minimum only removes float rounding).

    >>> grid, curve = np.array([0., .5, 1.]), np.array([[[0., .8, 1.]]])
    >>> [g.round(2).tolist() for g in lukv_gains(curve, grid, 4)]
    [[0.4, 0.4, 0.1, 0.1]]
    """
    layers, heads, _ = curves.shape
    if hull is None:  # `hull`: concave_hull(grid, curves) computed once by the caller
        hull = concave_hull(grid, curves)
    lengths = _lengths_array(lengths, layers, heads)
    gains = []
    for layer in range(layers):
        for head in range(heads):
            n = int(lengths[layer, head])
            if n == 0:
                gains.append(np.zeros(0))
                continue
            utility = np.interp(np.arange(n + 1) / n, grid, hull[layer, head])
            gains.append(np.minimum.accumulate(np.diff(utility)))
    return gains


def lukv_budgets(curves: np.ndarray, grid: np.ndarray, tokens: int, lengths: int | Sequence[int] | np.ndarray,
                 sink: int = 0, recent: int = 0, alpha: float = ADAHEAD_ALPHA,
                 hull: np.ndarray | None = None) -> np.ndarray:
    """LU-KV's greedy marginal-utility budgets (layers, heads) under the total tokens x layers x
    heads (at most the tokens there are), from profiled curves (layers, heads, grid) of utility
    against the kept fraction of a head's cache (HeadProfile.curves).

    Every head first gets its floor (head_floor), then each further token goes to the head whose
    next token adds the most utility on its concave hull (lukv_gains). On concave curves that
    greedy is optimal (the relaxed problem's optimum, LU-KV's Section on the convex-hull
    relaxation). Ties: the head with fewer tokens so far (equal gains spread evenly), then the
    lower layer, then the lower head. `lengths`: one per model, per layer, or per (layer, head).
    `hull`, if given, is concave_hull(grid, curves) (a caller deciding often computes it once).

    >>> grid = np.array([0., .5, 1.])
    >>> curves = np.array([[[0., .9, 1.], [0., .5, 1.]]])  # head 0 concentrated, head 1 spread
    >>> lukv_budgets(curves, grid, tokens=4, lengths=10, alpha=0.0).tolist()
    [[5, 3]]
    """
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 3 or curves.shape[2] != len(grid):
        raise InvalidArgument("budget.profile", f"curves must be (layers, heads, {len(grid)}), got {curves.shape}")
    _validate(tokens, sink, recent, alpha)
    layers, heads, _ = curves.shape
    lengths = _lengths_array(lengths, layers, heads)
    floors = np.vectorize(lambda n: head_floor(tokens, alpha, int(n), sink, recent), otypes=[np.int64])(lengths)
    target = min(layers * heads * tokens, int(lengths.sum()))
    extra = target - int(floors.sum())
    budgets = floors.copy()
    if extra <= 0:
        return budgets
    gains = lukv_gains(curves, grid, lengths, hull)
    values, steps, heads_flat = [], [], []
    for flat, gain in enumerate(gains):
        floor = int(floors.flat[flat])
        values.append(gain[floor:])
        steps.append(np.arange(floor, gain.size))
        heads_flat.append(np.full(gain.size - floor, flat))
    value, step, head = (np.concatenate(a) for a in (values, steps, heads_flat))
    # Larger gain first; ties: fewer tokens so far, then the lower (layer, head).
    chosen = _best(value, extra, [step, head])
    np.add.at(budgets.reshape(-1), head[chosen], 1)
    return budgets


# --- EpiCache --------------------------------------------------------------------------------------


def epicache_weights(similarity: Sequence[float], power: float = EPICACHE_POWER) -> np.ndarray:
    """EpiCache's layer weights from its layer scores (key similarity with and without a
    restricted attention mask; lower = more sensitive): min-max normalised s, then (1 - s) ** power.
    All scores equal: equal weights.

    >>> epicache_weights([1.0, 0.9, 0.8], power=1.0).tolist()
    [0.0, 0.5, 1.0]
    """
    scores = np.asarray(similarity, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
        raise InvalidArgument("budget.profile", "layer sensitivity must be a non-empty list of finite numbers")
    if power < 0:
        raise InvalidArgument("budget.power", f"must be >= 0, got {power}")
    span = scores.max() - scores.min()
    if span == 0:
        return np.ones_like(scores)
    return (1.0 - (scores - scores.min()) / span) ** power


def _water_level(weights: Sequence[Fraction], floor: int, total: int) -> list[Fraction]:
    """Quotas max(floor, c w) summing to `total` (exact rationals), the heaviest layers above floor."""
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    for above in range(len(weights), 0, -1):
        heavy = [weights[i] for i in order[:above]]
        if sum(heavy) == 0:
            continue
        level = Fraction(total - (len(weights) - above) * floor) / sum(heavy)
        lightest_above = level * heavy[-1]
        next_below = level * weights[order[above]] if above < len(weights) else Fraction(-1)
        if lightest_above >= floor and next_below <= floor:
            quotas = [Fraction(floor)] * len(weights)
            for i in order[:above]:
                quotas[i] = level * weights[i]
            return quotas
    return [Fraction(total, len(weights))] * len(weights)  # every weight 0 cannot happen (max weight 1)


def epicache_budgets(similarity: Sequence[float], tokens: int, heads: int, power: float = EPICACHE_POWER,
                     floor: int | None = None, sink: int = 0, recent: int = 0) -> np.ndarray:
    """EpiCache's per-layer budgets, repeated over the heads: (layers, heads).

    Quotas q_l = max(floor, c w_l) with w = epicache_weights and c such that they sum to exactly
    layers x tokens (EpiCache truncates, then raises layers to the floor, which overshoots the
    total; the water level keeps it exact and equals EpiCache where no layer is floored). The
    quotas are rounded down and the remainder goes, one token each, to the largest fractional
    parts, ties to the lower layer (computed in exact rationals). Floor: tokens // 4 (EpiCache's
    min_budget), at least 1 and above the protected tokens.

    >>> epicache_budgets([1.0, 0.9, 0.8], tokens=8, heads=2, power=1.0).tolist()
    [[2, 2], [7, 7], [15, 15]]
    """
    _validate(tokens, sink, recent, 0.0)
    weights = epicache_weights(similarity, power)
    if floor is None:
        floor = max(1, int(tokens * EPICACHE_FLOOR_FRACTION), sink + recent + 1)
    if not 0 <= floor <= tokens:
        raise InvalidArgument("budget.floor", f"must be in [0, {tokens}], got {floor}")
    total = len(weights) * tokens
    quotas = _water_level([Fraction(float(w)) for w in weights], floor, total)
    whole = [q.numerator // q.denominator for q in quotas]
    remainder = total - sum(whole)
    by_fraction = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - whole[i]), i))
    for layer in by_fraction[:remainder]:
        whole[layer] += 1
    return np.repeat(np.asarray(whole, dtype=np.int64)[:, None], heads, axis=1)


# --- the profile file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadProfile:
    """What `kvevict profile` measured on one model: LU-KV utility curves per (layer, KV head)
    and EpiCache's layer sensitivity. Stored as JSON (save_profile / load_profile).

    curves[l, h, k]: the share of the profiling text's future attention contribution (LU-KV's
    oracle importance, summed over kept tokens, over every head and layer it sums to 1 at k = last)
    that head (l, h) keeps when it keeps the fraction grid[k] of its cache, chosen by `metric`.
    sensitivity[l]: EpiCache's key similarity of layer l (1 = insensitive); may be empty.

    >>> profile = HeadProfile(model="m", grid=(0.0, 1.0), curves=np.array([[[0.0, 1.0]]]))
    >>> (profile.num_layers, profile.num_kv_heads)
    (1, 1)
    """

    model: str
    grid: tuple[float, ...]
    curves: np.ndarray
    sensitivity: tuple[float, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)  # how it was measured (metric, text, windows)

    def __post_init__(self) -> None:
        curves = np.asarray(self.curves, dtype=np.float64)
        grid = np.asarray(self.grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or grid[0] != 0.0 or grid[-1] != 1.0 or not (np.diff(grid) > 0).all():
            raise ValueError("profile grid: kept fractions increasing from 0 to 1")
        if curves.ndim != 3 or curves.shape[2] != grid.size:
            raise ValueError(f"profile curves: (layers, heads, {grid.size}) expected, got {curves.shape}")
        if not np.isfinite(curves).all() or (curves < 0).any():
            raise ValueError("profile curves: finite values >= 0 expected")
        if self.sensitivity and len(self.sensitivity) != curves.shape[0]:
            raise ValueError(f"profile sensitivity: {curves.shape[0]} layers expected, got {len(self.sensitivity)}")
        object.__setattr__(self, "curves", curves)
        object.__setattr__(self, "grid", tuple(float(x) for x in grid))
        object.__setattr__(self, "sensitivity", tuple(float(x) for x in self.sensitivity))

    @property
    def num_layers(self) -> int:
        return self.curves.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.curves.shape[1]

    def lukv(self, tokens: int, lengths: int | Sequence[int] | np.ndarray, sink: int = 0, recent: int = 0,
             alpha: float = ADAHEAD_ALPHA) -> np.ndarray:
        """lukv_budgets on this profile's curves.

        >>> HeadProfile(model="m", grid=(0.0, 1.0), curves=np.ones((1, 2, 2))).lukv(4, 10).tolist()
        [[4, 4]]
        """
        return lukv_budgets(self.curves, np.asarray(self.grid), tokens, lengths, sink, recent, alpha)

    def epicache(self, tokens: int, power: float = EPICACHE_POWER, sink: int = 0, recent: int = 0) -> np.ndarray:
        """epicache_budgets on this profile's layer sensitivity.

        >>> profile = HeadProfile(model="m", grid=(0.0, 1.0), curves=np.ones((2, 1, 2)), sensitivity=(1.0, 0.9))
        >>> profile.epicache(8).tolist()
        [[2], [14]]
        """
        if not self.sensitivity:
            raise InvalidArgument("budget.profile", "this profile has no layer sensitivity (EpiCache)")
        return epicache_budgets(self.sensitivity, tokens, self.num_kv_heads, power, sink=sink, recent=recent)

    def to_json(self) -> dict[str, Any]:
        """The file's content: curves rounded to 9 significant digits (float32's precision).

        >>> HeadProfile(model="m", grid=(0.0, 1.0), curves=np.array([[[0.0, 1 / 3]]])).to_json()["curves"]
        [[[0.0, 0.333333333]]]
        """
        return {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model": self.model,
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "grid": list(self.grid),
            "curves": [[[float(f"{v:.9g}") for v in row] for row in layer] for layer in self.curves.tolist()],
            "sensitivity": [float(f"{v:.9g}") for v in self.sensitivity],
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadProfile:
        """Checks the format and version; ValueError names what is wrong.

        >>> profile = HeadProfile(model="m", grid=(0.0, 1.0), curves=np.ones((1, 2, 2)), sensitivity=(1.0,))
        >>> HeadProfile.from_json(profile.to_json()).sensitivity
        (1.0,)
        """
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a {PROFILE_FORMAT} file")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile version {data.get('version')!r}; this kvevict reads version {PROFILE_VERSION}")
        profile = cls(model=str(data["model"]), grid=tuple(data["grid"]),
                      curves=np.asarray(data["curves"], dtype=float),
                      sensitivity=tuple(data.get("sensitivity", ())), settings=dict(data.get("settings", {})))
        if (profile.num_layers, profile.num_kv_heads) != (data["num_layers"], data["num_kv_heads"]):
            raise ValueError("profile curves do not match its num_layers and num_kv_heads")
        return profile


def save_profile(profile: HeadProfile, path: str | Path) -> int:
    """Writes `profile` as JSON; returns the bytes written.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "p.json")
    >>> save_profile(HeadProfile(model="m", grid=(0.0, 1.0), curves=np.zeros((1, 1, 2))), path) > 0
    True
    """
    text = json.dumps(profile.to_json(), separators=(",", ":"))
    Path(path).write_text(text + "\n", encoding="utf-8")
    return len(text) + 1


def load_profile(path: str | Path) -> HeadProfile:
    """Reads a file save_profile wrote; ValueError names the file and what is wrong.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "p.json")
    >>> _ = save_profile(HeadProfile(model="m", grid=(0.0, 1.0), curves=np.ones((2, 3, 2))), path)
    >>> load_profile(path).curves.shape
    (2, 3, 2)
    """
    try:
        return HeadProfile.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a readable head profile ({error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
