"""Per-(layer, KV head) budgets: adahead, global, lukv and epicache against brute-force versions
(exhaustive sorts, enumerations of every feasible budget vector, DP, subset enumeration), their
totals, floors and tie rules, the keep masks, the policy check and the profile file."""

from __future__ import annotations

import doctest
import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvevict.cache_manager import InvalidArgument, head_budgets
from kvevict.cache_manager.head_budgets import (
    ADAHEAD_ALPHA, COMPARABLE_BASES, COMPARABLE_WRAPPERS, HEAD_ALLOCATORS, HeadProfile, accepts_policy,
    adahead_budgets, adahead_budgets_ragged, check_comparable, concave_hull, epicache_budgets, global_budgets,
    global_budgets_ragged, keep_masks, keep_masks_ragged, load_profile, lukv_budgets, lukv_gains, save_profile,
)
from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.cache_manager.wrappers import WRAPPERS

SMALL = settings(max_examples=150, deadline=None)


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def floor_of(tokens: int, alpha: float, length: int, sink: int, recent: int) -> int:
    return min(length, max(half_up(alpha * tokens), min(length, sink + recent)))


def protected_columns(length: int, sink: int, recent: int) -> set[int]:
    return {c for c in range(length) if c < sink or c >= length - recent}


# --- brute force: sort-based top-k --------------------------------------------------------------


def brute_top_k(scores: list[np.ndarray], tokens: int, sink: int, recent: int, alpha: float,
                groups: list[list[int]]) -> tuple[np.ndarray, list[set]]:
    """Each head's floor from its own sorted tokens, then every other middle token of the group
    sorted as (score desc, column desc, layer, head); returns budgets and each layer's kept set."""
    heads = scores[0].shape[0]
    budgets = np.zeros((len(scores), heads), dtype=int)
    kept: list[set] = [set() for _ in scores]
    for group in groups:
        rest = []
        total = min(len(group) * heads * tokens, heads * sum(scores[layer].shape[1] for layer in group))
        used = 0
        for layer in group:
            length = scores[layer].shape[1]
            floor = floor_of(tokens, alpha, length, sink, recent)
            protected = protected_columns(length, sink, recent)
            for head in range(heads):
                middle = sorted(((-float(scores[layer][head, c]), -c) for c in range(length) if c not in protected))
                picks = floor - len(protected)
                kept[layer] |= {(head, c) for c in protected} | {(head, -c) for _, c in middle[:picks]}
                rest += [(s, c, layer, head) for s, c in middle[picks:]]
                budgets[layer, head] = floor
                used += floor
        for _, c, layer, head in sorted(rest)[:total - used]:
            budgets[layer, head] += 1
            kept[layer].add((head, -c))
    return budgets, kept


def head_sums(score: np.ndarray, sink: int, recent: int) -> list[list[float]]:
    """Per head: the sums of its b best middle scores, b = 0, 1, ..."""
    length = score.shape[1]
    protected = protected_columns(length, sink, recent)
    out = []
    for row in score:
        middle = sorted((float(row[c]) for c in range(length) if c not in protected), reverse=True)
        out.append([sum(middle[:b]) for b in range(len(middle) + 1)])
    return out


def best_total(scores: list[np.ndarray], tokens: int, sink: int, recent: int, alpha: float) -> float:
    """Enumerates every budget vector of every head of every layer (floors, the shared total):
    the best sum of kept middle scores any allocation reaches."""
    heads = scores[0].shape[0]
    lengths = [s.shape[1] for s in scores]
    total = min(len(scores) * heads * tokens, heads * sum(lengths))
    options, sums = [], []
    for score, length in zip(scores, lengths):
        floor = floor_of(tokens, alpha, length, sink, recent)
        p = min(length, sink + recent)
        for head_sum in head_sums(score, sink, recent):
            options.append(range(floor, length + 1))
            sums.append((head_sum, p))
    best = -math.inf
    for vector in itertools.product(*options):
        if sum(vector) == total:
            best = max(best, sum(s[b - p] for (s, p), b in zip(sums, vector)))
    return best


def kept_total(scores: list[np.ndarray], budgets: np.ndarray, sink: int, recent: int) -> float:
    return sum(head_sums(score, sink, recent)[h][budgets[layer, h] - min(score.shape[1], sink + recent)]
               for layer, score in enumerate(scores) for h in range(score.shape[0]))


@st.composite
def report(draw, max_layers: int = 3, max_heads: int = 3, max_length: int = 9):
    """Small reports: integer scores (many ties, exact sums), lengths below and above the budget."""
    layers = draw(st.integers(1, max_layers))
    heads = draw(st.integers(1, max_heads))
    tokens = draw(st.integers(1, 6))
    sink = draw(st.integers(0, 2))
    recent = draw(st.integers(0, 2))
    if sink + recent >= tokens:
        sink, recent = 0, 0
    alpha = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    scores = [np.array(draw(st.lists(st.lists(st.integers(0, 4), min_size=n, max_size=n), min_size=heads,
                                     max_size=heads)), dtype=np.float64).reshape(heads, n)
              for n in draw(st.lists(st.integers(1, max_length), min_size=layers, max_size=layers))]
    return scores, tokens, sink, recent, alpha


@SMALL
@given(report())
def test_adahead_equals_the_brute_force_sort(case) -> None:
    scores, tokens, sink, recent, alpha = case
    budgets = adahead_budgets(scores, tokens, sink, recent, alpha)
    expected, kept = brute_top_k(scores, tokens, sink, recent, alpha, [[layer] for layer in range(len(scores))])
    assert budgets.tolist() == expected.tolist()
    for layer, (score, mask) in enumerate(zip(scores, keep_masks(scores, budgets, sink, recent))):
        assert set(zip(*np.nonzero(mask))) == kept[layer]  # the top-k's own picks, ties included
        heads, length = score.shape
        assert budgets[layer].sum() == min(heads * tokens, heads * length)
        assert (budgets[layer] >= floor_of(tokens, alpha, length, sink, recent)).all()


@SMALL
@given(report())
def test_global_equals_the_brute_force_sort(case) -> None:
    scores, tokens, sink, recent, alpha = case
    budgets = global_budgets(scores, tokens, sink, recent, alpha)
    expected, kept = brute_top_k(scores, tokens, sink, recent, alpha, [list(range(len(scores)))])
    assert budgets.tolist() == expected.tolist()
    heads = scores[0].shape[0]
    assert budgets.sum() == min(len(scores) * heads * tokens, heads * sum(s.shape[1] for s in scores))
    for layer, (score, mask) in enumerate(zip(scores, keep_masks(scores, budgets, sink, recent))):
        assert set(zip(*np.nonzero(mask))) == kept[layer]
        assert (budgets[layer] >= floor_of(tokens, alpha, score.shape[1], sink, recent)).all()


@settings(max_examples=60, deadline=None)
@given(report(max_layers=2, max_heads=2, max_length=6))
def test_top_k_allocations_keep_the_best_total_any_allocation_can(case) -> None:
    scores, tokens, sink, recent, alpha = case
    assert kept_total(scores, global_budgets(scores, tokens, sink, recent, alpha), sink, recent) == \
        best_total(scores, tokens, sink, recent, alpha)
    for layer, score in enumerate(scores):
        budgets = adahead_budgets([score], tokens, sink, recent, alpha)
        assert kept_total([score], budgets, sink, recent) == best_total([score], tokens, sink, recent, alpha)


# --- ragged caches: every head its own length ------------------------------------------------


def brute_top_k_ragged(rows: list[list[np.ndarray]], tokens: int, sink: int, recent: int, alpha: float,
                       groups: list[list[int]]) -> tuple[np.ndarray, list[list[set]]]:
    """brute_top_k with each head's own length: its floor from its own sorted tokens (its own
    first `sink` and last `recent` protected), then every other middle token of the group sorted
    as (score desc, cache column desc, layer, head), up to min(tokens x heads x layers, held)."""
    heads = len(rows[0])
    budgets = np.zeros((len(rows), heads), dtype=int)
    kept = [[set() for _ in range(heads)] for _ in rows]
    for group in groups:
        rest, used = [], 0
        total = min(len(group) * heads * tokens, sum(len(row) for layer in group for row in rows[layer]))
        for layer in group:
            for head, row in enumerate(rows[layer]):
                length = len(row)
                floor = floor_of(tokens, alpha, length, sink, recent)
                protected = protected_columns(length, sink, recent)
                middle = sorted((-float(row[c]), -c) for c in range(length) if c not in protected)
                picks = floor - len(protected)
                kept[layer][head] |= protected | {-c for _, c in middle[:picks]}
                rest += [(v, c, layer, head) for v, c in middle[picks:]]
                budgets[layer, head] = floor
                used += floor
        for _, c, layer, head in sorted(rest)[:total - used]:
            budgets[layer, head] += 1
            kept[layer][head].add(-c)
    return budgets, kept


@st.composite
def ragged_report(draw, max_layers: int = 3, max_heads: int = 3, max_length: int = 9):
    """Small ragged reports: integer scores (many ties), each head its own length (0 allowed)."""
    layers = draw(st.integers(1, max_layers))
    heads = draw(st.integers(1, max_heads))
    tokens = draw(st.integers(1, 6))
    sink = draw(st.integers(0, 2))
    recent = draw(st.integers(0, 2))
    if sink + recent >= tokens:
        sink, recent = 0, 0
    alpha = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    rows = [[np.array(draw(st.lists(st.integers(0, 4), min_size=0, max_size=max_length)), dtype=np.float64)
             for _ in range(heads)] for _ in range(layers)]
    return rows, tokens, sink, recent, alpha


@SMALL
@given(ragged_report())
def test_ragged_adahead_equals_the_brute_force_sort(case) -> None:
    rows, tokens, sink, recent, alpha = case
    budgets = adahead_budgets_ragged(rows, tokens, sink, recent, alpha)
    expected, kept = brute_top_k_ragged(rows, tokens, sink, recent, alpha, [[layer] for layer in range(len(rows))])
    assert budgets.tolist() == expected.tolist()
    for layer, masks in enumerate(keep_masks_ragged(rows, budgets, sink, recent)):
        held = sum(len(row) for row in rows[layer])
        assert budgets[layer].sum() == min(len(rows[layer]) * tokens, held)  # exact total per layer
        for head, (row, mask) in enumerate(zip(rows[layer], masks)):
            assert mask.shape == (len(row),)
            assert set(np.flatnonzero(mask).tolist()) == kept[layer][head]  # the top-k's own picks
            assert budgets[layer, head] >= floor_of(tokens, alpha, len(row), sink, recent)
            assert budgets[layer, head] <= len(row)


@SMALL
@given(ragged_report())
def test_ragged_global_equals_the_brute_force_sort(case) -> None:
    rows, tokens, sink, recent, alpha = case
    budgets = global_budgets_ragged(rows, tokens, sink, recent, alpha)
    expected, kept = brute_top_k_ragged(rows, tokens, sink, recent, alpha, [list(range(len(rows)))])
    assert budgets.tolist() == expected.tolist()
    held = sum(len(row) for layer in rows for row in layer)
    assert budgets.sum() == min(len(rows) * len(rows[0]) * tokens, held)
    for layer, masks in enumerate(keep_masks_ragged(rows, budgets, sink, recent)):
        for head, mask in enumerate(masks):
            assert set(np.flatnonzero(mask).tolist()) == kept[layer][head]


@SMALL
@given(report())
def test_ragged_functions_equal_the_rectangular_ones_on_equal_lengths(case) -> None:
    scores, tokens, sink, recent, alpha = case
    rows = [list(score) for score in scores]
    assert adahead_budgets_ragged(rows, tokens, sink, recent, alpha).tolist() == \
        adahead_budgets(scores, tokens, sink, recent, alpha).tolist()
    budgets = global_budgets(scores, tokens, sink, recent, alpha)
    assert global_budgets_ragged(rows, tokens, sink, recent, alpha).tolist() == budgets.tolist()
    for masks, mask in zip(keep_masks_ragged(rows, budgets, sink, recent), keep_masks(scores, budgets, sink, recent)):
        assert np.array_equal(np.stack(masks), mask)


def test_a_ragged_head_protects_its_own_ends() -> None:
    rows = [[np.array([9., 0., 0., 0., 0., 0., 1.]), np.array([0., 5., 5., 0.])]]
    budgets = adahead_budgets_ragged(rows, tokens=3, sink=1, recent=1, alpha=0.0)
    assert budgets.tolist() == [[2, 4]]  # head 1's 5s beat head 0's middle zeros
    masks = keep_masks_ragged(rows, budgets, sink=1, recent=1)[0]
    assert masks[0].astype(int).tolist() == [1, 0, 0, 0, 0, 0, 1]
    assert masks[1].astype(int).tolist() == [1, 1, 1, 1]


def test_ragged_rows_are_checked() -> None:
    with pytest.raises(InvalidArgument) as error:
        adahead_budgets_ragged([[np.zeros(3)], [np.zeros(3), np.zeros(2)]], tokens=2)
    assert error.value.field == "layers"
    with pytest.raises(InvalidArgument) as error:
        global_budgets_ragged([[np.zeros(3)], [np.array([np.nan])]], tokens=2)
    assert error.value.field == "layers[1]"
    with pytest.raises(InvalidArgument) as error:
        keep_masks_ragged([[np.zeros(3)]], np.array([[1, 1]]))
    assert error.value.field == "budgets"


@SMALL
@given(st.data())
def test_lukv_takes_every_heads_own_length(data) -> None:
    layers, heads = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    grid = np.array([0.0, 0.25, 0.5, 1.0])
    raw = data.draw(st.lists(st.floats(0.0, 1.0), min_size=layers * heads * 3, max_size=layers * heads * 3))
    curves = np.concatenate([np.zeros((layers, heads, 1)),
                             np.cumsum(np.reshape(raw, (layers, heads, 3)), axis=-1)], axis=-1)
    lengths = np.array(data.draw(st.lists(st.integers(0, 12), min_size=layers * heads, max_size=layers * heads)))
    lengths = lengths.reshape(layers, heads)
    tokens = data.draw(st.integers(1, 6))
    budgets = lukv_budgets(curves, grid, tokens, lengths, alpha=0.2)
    assert (budgets <= lengths).all() and (budgets >= np.minimum(lengths, half_up(0.2 * tokens))).all()
    assert budgets.sum() == min(layers * heads * tokens, int(lengths.sum()))
    # The greedy: every kept token's gain >= every left one's, on each head's own hull and length.
    gains = lukv_gains(curves, grid, lengths)
    floor = np.minimum(lengths, half_up(0.2 * tokens)).ravel()
    taken = [g for flat, g in enumerate(gains) for g in g[floor[flat]:budgets.ravel()[flat]]]
    left = [g for flat, g in enumerate(gains) for g in g[budgets.ravel()[flat]:]]
    if taken and left:
        assert min(taken) >= max(left) - 1e-12


def test_adahead_follows_kvpress_safeguard_on_a_concentrated_head() -> None:
    # Head 0 holds all the mass: without a floor it takes everything; alpha 0.2 leaves head 1 its
    # round(0.2 x 10) = 2 best tokens (the last two columns) and head 0 the other 18.
    scores = [np.stack([np.linspace(10, 9, 40), np.linspace(0, 1, 40)])]
    budgets = adahead_budgets(scores, tokens=10)
    assert budgets.tolist() == [[18, 2]]
    mask = keep_masks(scores, budgets)[0]
    assert np.flatnonzero(mask[1]).tolist() == [38, 39] and np.flatnonzero(mask[0]).tolist() == list(range(18))
    assert adahead_budgets(scores, tokens=10, alpha=0.0).tolist() == [[20, 0]]


def test_ties_go_to_the_more_recent_token_then_the_lower_head() -> None:
    scores = [np.ones((2, 6))]
    budgets = adahead_budgets(scores, tokens=2, alpha=0.0)
    # Every score equal: the most recent columns first, the lower head before the higher at each.
    assert budgets.tolist() == [[2, 2]]
    assert keep_masks(scores, budgets)[0].astype(int).tolist() == [[0, 0, 0, 0, 1, 1]] * 2
    assert adahead_budgets([np.ones((2, 6))], tokens=3, alpha=0.0).tolist() == [[3, 3]]
    assert global_budgets([np.ones((1, 4)), np.ones((1, 4))], tokens=1, alpha=0.0).tolist() == [[1], [1]]
    assert global_budgets([np.ones((1, 4)), np.ones((1, 6))], tokens=1, alpha=0.0).tolist() == [[0], [2]]
    assert global_budgets([np.ones((1, 4)), np.ones((1, 5))], tokens=1, alpha=0.0).tolist() == [[1], [1]]


def test_protected_tokens_count_toward_their_head_and_are_always_kept() -> None:
    rng = np.random.default_rng(5)
    scores = [rng.random((3, 50)) for _ in range(4)]
    scores[0][0] *= 100  # one head dominates
    for allocate in (adahead_budgets, global_budgets):
        budgets = allocate(scores, 12, sink=2, recent=3, alpha=0.0)
        assert (budgets >= 5).all()
        for layer, mask in enumerate(keep_masks(scores, budgets, sink=2, recent=3)):
            assert mask[:, :2].all() and mask[:, -3:].all()
            assert mask.sum(axis=1).tolist() == budgets[layer].tolist()


@pytest.mark.parametrize("call, field", [
    (lambda: adahead_budgets([np.ones((2, 5))], 4, sink=2, recent=2), "policy.recent_tokens"),
    (lambda: adahead_budgets([np.ones((2, 5))], 0), "budget.tokens"),
    (lambda: adahead_budgets([np.ones((2, 5))], 4, alpha=1.5), "budget.alpha"),
    (lambda: global_budgets([np.full((2, 5), np.nan)], 4), "layers[0]"),
    (lambda: global_budgets([np.ones((2, 5)), np.ones((3, 5))], 4), "layers"),
    (lambda: keep_masks([np.ones((2, 5))], np.array([[1, 1]]), sink=2), "budgets[0]"),
    (lambda: lukv_budgets(np.ones((1, 1, 2)), np.array([0.0, 1.0]), 4, lengths=[5, 6]), "cache_lengths"),
])
def test_invalid_arguments_name_the_field(call, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        call()
    assert raised.value.field == field


# --- which policies global accepts ---------------------------------------------------------------


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("base", list(BASE_POLICIES))
def test_global_accepts_only_comparable_scores(base: str, wrapper: str) -> None:
    comparable = wrapper in ("caote", "fastcaote") or base in ("laprox", "kvzip")  # probabilities: kvzip
    assert accepts_policy("global", base, wrapper) is comparable
    for name in ("adahead", "lukv", "epicache"):
        assert accepts_policy(name, base, wrapper)
        check_comparable(name, base, wrapper)
    if comparable:
        check_comparable("global", base, wrapper)
    else:
        with pytest.raises(InvalidArgument) as raised:
            check_comparable("global", base, wrapper)
        assert raised.value.field == "budget.allocator"
        assert "comparable across heads and layers" in str(raised.value) and "caote" in str(raised.value)


def test_the_registry_flags_the_comparable_allocator() -> None:
    assert [name for name, info in HEAD_ALLOCATORS.items() if info.comparable_only] == ["global"]
    assert set(COMPARABLE_WRAPPERS) <= set(WRAPPERS) and set(COMPARABLE_BASES) <= set(BASE_POLICIES)
    with pytest.raises(InvalidArgument):
        check_comparable("nope", "h2o", "none")


# --- LU-KV ---------------------------------------------------------------------------------------


def brute_concave_majorant(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """At each grid point, the highest chord between two points on either side of it."""
    out = np.empty_like(values)
    for m, x in enumerate(grid):
        best = values[m]
        for i in range(m + 1):
            for j in range(m, len(grid)):
                if i < j:
                    best = max(best, values[i] + (values[j] - values[i]) * (x - grid[i]) / (grid[j] - grid[i]))
        out[m] = best
    return out


@st.composite
def curves_on_a_grid(draw, heads: int = 1):
    points = draw(st.integers(2, 7))
    inner = sorted(draw(st.lists(st.floats(0.01, 0.99), min_size=points - 2, max_size=points - 2, unique=True)))
    grid = np.array([0.0, *inner, 1.0])
    if (np.diff(grid) < 1e-3).any():
        grid = np.linspace(0, 1, points)
    steps = np.array(draw(st.lists(st.floats(0, 1), min_size=heads * (points - 1), max_size=heads * (points - 1))))
    curves = np.concatenate([np.zeros((heads, 1)), np.cumsum(steps.reshape(heads, points - 1), axis=1)], axis=1)
    return grid, curves


@SMALL
@given(curves_on_a_grid())
def test_the_hull_is_the_least_concave_majorant(case) -> None:
    grid, curves = case
    hull = concave_hull(grid, curves)
    assert np.allclose(hull[0], brute_concave_majorant(grid, curves[0]), atol=1e-9)
    assert np.allclose(concave_hull(grid, hull), hull, atol=1e-9)  # concave curves are their own hull
    slopes = np.diff(hull[0]) / np.diff(grid)
    assert (np.diff(slopes) <= 1e-9).all() and (slopes >= -1e-12).all()


def test_the_hull_never_decreases() -> None:
    grid = np.array([0.0, 0.5, 1.0])
    assert concave_hull(grid, np.array([0.0, 1.0, 0.5])).tolist() == [0.0, 1.0, 1.0]


def brute_gains(curves: np.ndarray, grid: np.ndarray, n: int) -> list[float]:
    if n == 0:
        return []
    hull = brute_concave_majorant(grid, curves)
    utility = [float(np.interp(b / n, grid, hull)) for b in range(n + 1)]
    return [utility[b] - utility[b - 1] for b in range(1, n + 1)]


def dp_best(gains: list[np.ndarray], floors: list[int], total: int) -> float:
    """Exact optimum of the separable problem by dynamic programming over heads."""
    best = {0: 0.0}
    for gain, floor in zip(gains, floors):
        cumulative = np.concatenate([[0.0], np.cumsum(gain)])
        step = {}
        for used, value in best.items():
            for b in range(floor, len(gain) + 1):
                if used + b <= total:
                    step[used + b] = max(step.get(used + b, -math.inf), value + cumulative[b])
        best = step
    return best[total]


@st.composite
def lukv_case(draw):
    layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    grid, curves = draw(curves_on_a_grid(heads=layers * heads))
    tokens = draw(st.integers(1, 6))
    sink, recent = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    if sink + recent >= tokens:
        sink = recent = 0
    lengths = np.array(draw(st.lists(st.integers(0, 12), min_size=layers * heads, max_size=layers * heads)))
    alpha = draw(st.sampled_from([0.0, 0.2, 0.5]))
    return curves.reshape(layers, heads, -1), grid, tokens, lengths.reshape(layers, heads), sink, recent, alpha


@SMALL
@given(lukv_case())
def test_lukv_is_the_greedy_on_the_hulls_and_optimal(case) -> None:
    curves, grid, tokens, lengths, sink, recent, alpha = case
    budgets = lukv_budgets(curves, grid, tokens, lengths, sink, recent, alpha)
    layers, heads, _ = curves.shape
    floors = [floor_of(tokens, alpha, int(n), sink, recent) for n in lengths.flat]
    total = min(layers * heads * tokens, int(lengths.sum()))
    assert int(budgets.sum()) == total
    assert (budgets.reshape(-1) >= floors).all() and (budgets <= lengths).all()
    gains = lukv_gains(curves, grid, lengths)
    for flat, gain in enumerate(gains):
        expected = brute_gains(curves.reshape(-1, len(grid))[flat], grid, int(lengths.flat[flat]))
        assert np.allclose(gain, expected, atol=1e-9)
    # Brute-force greedy: every gain past the floors, sorted (gain desc, tokens so far, layer, head).
    candidates = sorted((-float(g), b, flat) for flat, gain in enumerate(gains)
                        for b, g in enumerate(gain) if b >= floors[flat])
    expected = np.array(floors)
    for _, _, flat in candidates[:total - sum(floors)]:
        expected[flat] += 1
    assert budgets.reshape(-1).tolist() == expected.tolist()
    value = sum(float(np.sum(gain[:b])) for gain, b in zip(gains, budgets.reshape(-1)))
    assert value == pytest.approx(dp_best(gains, floors, total), abs=1e-9)


def test_lukv_moves_budget_to_heads_whose_utility_keeps_rising() -> None:
    grid = np.linspace(0, 1, 5)
    flat_early = np.array([0.0, 0.9, 0.95, 0.98, 1.0])  # one sink-like head: a few tokens hold it all
    spread = np.array([0.0, 0.25, 0.5, 0.75, 1.0])  # attention spread evenly
    curves = np.stack([flat_early, spread])[None]
    # 90% of head 0's utility sits in its first 250 tokens (0.0036 a token, head 1: 0.001): it takes
    # all but head 1's floor of a small total, and stops where its curve flattens in a large one.
    assert lukv_budgets(curves, grid, tokens=100, lengths=1000).tolist() == [[180, 20]]
    assert lukv_budgets(curves, grid, tokens=300, lengths=1000).tolist() == [[250, 350]]
    # Equal curves: equal gains everywhere, spread evenly over the heads.
    same = np.tile(spread, (3, 4, 1))
    assert (lukv_budgets(same, grid, tokens=37, lengths=500) == 37).all()
    # Fewer tokens than the total: every head keeps all it has.
    assert (lukv_budgets(same, grid, tokens=37, lengths=20) == 20).all()


def test_lukv_floors_hold_against_a_dominant_head() -> None:
    grid = np.linspace(0, 1, 3)
    curves = np.array([[[0.0, 100.0, 200.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    # The flat heads keep their floor round(0.2 x 50) = 10 (above their 2 + 3 protected tokens).
    assert lukv_budgets(curves, grid, tokens=50, lengths=1000, sink=2, recent=3).tolist() == [[130, 10, 10]]
    # Without alpha the protected tokens are the floor; with more protected than alpha's share, those.
    assert lukv_budgets(curves, grid, tokens=50, lengths=1000, sink=2, recent=3, alpha=0.0).tolist() == [[140, 5, 5]]
    assert lukv_budgets(curves, grid, tokens=50, lengths=1000, sink=4, recent=8).tolist() == [[126, 12, 12]]


# --- EpiCache ------------------------------------------------------------------------------------


def brute_epicache(similarity: list[float], tokens: int, power: float, floor: int) -> list[int]:
    s = np.asarray(similarity, dtype=np.float64)
    if s.max() == s.min():
        weights = [Fraction(1)] * len(s)
    else:
        weights = [Fraction(float((1 - (v - s.min()) / (s.max() - s.min())) ** power)) for v in s]
    total = len(s) * tokens
    solutions = set()
    for clamped in itertools.product([False, True], repeat=len(s)):
        free = [w for w, c in zip(weights, clamped) if not c]
        if not free or sum(free) == 0:
            continue
        level = Fraction(total - floor * sum(clamped)) / sum(free)
        if all((level * w <= floor) if c else (level * w >= floor) for w, c in zip(weights, clamped)):
            solutions.add(tuple(Fraction(floor) if c else level * w for w, c in zip(weights, clamped)))
    assert len(solutions) == 1, solutions  # the water level is unique
    quotas = solutions.pop()
    best = None
    windows = [range(max(floor, q.numerator // q.denominator - 1), q.numerator // q.denominator + 3) for q in quotas]
    for vector in itertools.product(*windows):
        if sum(vector) != total:
            continue
        key = (sum((b - q) ** 2 for b, q in zip(vector, quotas)), tuple(-b for b in vector))
        if best is None or key < best[0]:
            best = (key, vector)
    return list(best[1])


@SMALL
@given(st.lists(st.floats(0.5, 1.0), min_size=1, max_size=5), st.integers(1, 40),
       st.sampled_from([0.0, 0.5, 1.1, 1.3, 3.0]))
def test_epicache_equals_the_brute_force(similarity: list[float], tokens: int, power: float) -> None:
    budgets = epicache_budgets(similarity, tokens, heads=2, power=power)
    floor = max(1, tokens // 4)
    assert budgets.shape == (len(similarity), 2) and (budgets[:, 0] == budgets[:, 1]).all()
    assert budgets[:, 0].tolist() == brute_epicache(similarity, tokens, power, floor)
    assert budgets[:, 0].sum() == len(similarity) * tokens and (budgets >= floor).all()


def test_epicache_matches_its_reference_formula_where_no_layer_is_floored() -> None:
    # EpiCache: budget = int(w x total / sum w), then max(., tokens // 4); here no layer needs the floor.
    similarity = [0.2, 0.5, 0.55, 0.7, 0.79, 0.8]
    tokens = 1000
    s = np.array(similarity)
    weights = (1 - (s - s.min()) / (s.max() - s.min())) ** 1.1
    reference = np.floor(weights * 6 * tokens / weights.sum()).astype(int)
    budgets = epicache_budgets(similarity, tokens, heads=1)[:, 0]
    assert budgets.sum() == 6 * tokens
    floored = reference < tokens // 4
    assert floored.tolist() == [False, False, False, False, True, True]
    # Ours re-levels the two floored layers' excess over the others: never more, and exact total.
    assert (budgets[~floored] <= reference[~floored] + 1).all() and (budgets[floored] == tokens // 4).all()
    assert epicache_budgets([0.9, 0.9, 0.9], 64, heads=3).tolist() == [[64] * 3] * 3


def test_epicache_gives_the_most_sensitive_layer_the_most() -> None:
    budgets = epicache_budgets([1.0, 0.95, 0.6, 0.9], 100, heads=1)[:, 0]
    assert budgets.argmax() == 2 and budgets[0] == 25 and budgets.sum() == 400


# --- the profile file ----------------------------------------------------------------------------


def test_profile_round_trips_and_its_size_is_what_was_written(tmp_path) -> None:
    rng = np.random.default_rng(1)
    curves = np.sort(rng.random((30, 3, 66)), axis=-1) / 90
    profile = HeadProfile(model="smollm2-135m-instruct", grid=tuple(np.linspace(0, 1, 66)), curves=curves,
                          sensitivity=tuple(rng.random(30)), settings={"metric": "snapkv"})
    path = tmp_path / "p.json"
    size = save_profile(profile, path)
    assert size == path.stat().st_size
    loaded = load_profile(path)
    assert loaded.model == profile.model and loaded.settings == {"metric": "snapkv"}
    assert np.allclose(loaded.curves, curves, rtol=1e-8, atol=0) and loaded.grid == profile.grid
    assert np.allclose(loaded.sensitivity, profile.sensitivity, rtol=1e-8)
    assert (loaded.lukv(64, 1000) == lukv_budgets(curves, np.asarray(profile.grid), 64, 1000)).all()
    assert loaded.epicache(64).sum() == 64 * 30 * 3


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="other"), "not a kvevict-head-profile file"),
    (lambda d: d.update(version=2), "profile version 2"),
    (lambda d: d.update(num_layers=3), "do not match"),
    (lambda d: d.update(grid=[0.0, 0.7]), "increasing from 0 to 1"),
    (lambda d: d["curves"][0][0].__setitem__(0, -1.0), "finite values >= 0"),
    (lambda d: d.update(sensitivity=[1.0, 2.0, 3.0]), "sensitivity"),
    (lambda d: d.pop("curves"), "not a readable head profile"),
])
def test_bad_profiles_are_refused_with_the_reason(tmp_path, change, message: str) -> None:
    path = tmp_path / "p.json"
    save_profile(HeadProfile(model="m", grid=(0.0, 0.5, 1.0), curves=np.ones((2, 2, 3)), sensitivity=(1.0, 0.5)),
                 path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_profile(path)
    with pytest.raises(InvalidArgument):
        HeadProfile(model="m", grid=(0.0, 1.0), curves=np.ones((1, 1, 2))).epicache(8)


def test_the_docstring_examples_run() -> None:
    result = doctest.testmod(head_budgets)
    assert result.attempted >= 25 and result.failed == 0


def test_the_default_alpha_is_adakvs() -> None:
    assert ADAHEAD_ALPHA == 0.2
