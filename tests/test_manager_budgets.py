"""Per-layer budget allocators: uniform, pyramid (PyramidKV schedule) and adaptive (one global
CAOTE ranking across layers with a per-layer floor), directly and through a ManagerCore."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvevict.cache_manager import InvalidArgument
from kvevict.cache_manager.budgets import (
    ADAPTIVE_FLOOR_FRACTION, ALLOCATORS, Adaptive, Pyramid, make_allocator, pyramid_budgets,
)
from kvevict.cache_manager.geometry import Geometry
from kvevict.v1 import cache_manager_pb2 as pb
from tests.test_manager_support import open_request, start

SHAPES = [(1, 64), (2, 7), (3, 24), (5, 100), (32, 2048), (80, 513), (7, 1)]


def geometry(layers: int) -> Geometry:
    return Geometry(num_layers=layers, num_kv_heads=2, num_query_heads=4, head_dim=8)


@pytest.mark.parametrize("name", list(ALLOCATORS))
@pytest.mark.parametrize("layers,tokens", SHAPES)
def test_initial_totals_are_layers_times_tokens(name: str, layers: int, tokens: int) -> None:
    recent = 0 if tokens < 4 else tokens // 4
    budgets = make_allocator(name, tokens, recent=recent).initial_budgets(geometry(layers))
    assert len(budgets) == layers and sum(budgets) == layers * tokens
    assert all(isinstance(b, int) for b in budgets)


# --- pyramid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,tokens", [s for s in SHAPES if s[0] > 1])
@pytest.mark.parametrize("window_fraction", [0.0, 0.25, 0.5])
def test_pyramid_follows_the_pyramidkv_formula(layers: int, tokens: int, window_fraction: float) -> None:
    window = int(tokens * window_fraction)
    budgets = Pyramid(tokens, recent=window).initial_budgets(geometry(layers))
    # Independent float computation of the paper's schedule.
    low = (tokens - window) / 20
    high = 2 * (tokens - window) - low
    exact = np.array([high - layer * (high - low) / (layers - 1) + window for layer in range(layers)])
    assert sum(budgets) == layers * tokens
    assert np.all(np.abs(np.array(budgets) - exact) < 1.0), (budgets, exact)
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), "not non-increasing with depth"
    assert budgets[0] in (math.floor(high + window), math.ceil(high + window))
    assert budgets[-1] in (math.floor(low + window), math.ceil(low + window))


def test_pyramid_known_values_and_one_layer() -> None:
    assert pyramid_budgets(24, 3, 12) == [35, 24, 13]
    assert pyramid_budgets(100, 2, 0) == [195, 5]
    assert Pyramid(64, recent=32).initial_budgets(geometry(1)) == [64]
    assert pyramid_budgets(7, 1, 7) == [7]


def test_pyramid_through_the_manager_keeps_each_layer_budget() -> None:
    session = start(open_request("h2o", "caote", budget=24, allocator="pyramid", num_layers=3))
    assert list(session.opened.layer_budgets) == [35, 24, 13]  # h2o: recent = 24 // 2
    response = session.report(40)
    assert list(response.layer_budgets) == [35, 24, 13]
    kept = {keep.layer: keep.kept_tokens for keep in response.keeps}
    assert kept == {0: 35, 1: 24, 2: 13}
    assert [p.shape[1] for p in session.positions] == [35, 24, 13]


def test_pyramid_window_holds_sinks_and_recent_tokens_in_every_layer() -> None:
    # w = 4 + 8: top layer 12 + 12 / 20 -> 13 (PyramidKV's minimum above the window), so even the
    # smallest layer keeps every protected token and scores at least one more.
    session = start(open_request("h2o", budget=24, sink=4, recent=8, allocator="pyramid", num_layers=3))
    assert list(session.opened.layer_budgets) == pyramid_budgets(24, 3, 12) == [35, 24, 13]
    # Streaming's 4 sinks at 5% of a 1024-token context: the top layer keeps 4 + 47 / 20 -> 6.
    session = start(open_request("streaming", budget=51, allocator="pyramid", num_layers=4))
    assert list(session.opened.layer_budgets) == [96, 66, 36, 6]


@pytest.mark.parametrize("sink,recent", [(0, 24), (8, 16), (12, 20)])
def test_pyramid_rejects_protection_that_leaves_no_room(sink: int, recent: int) -> None:
    session_request = open_request("h2o", budget=24, sink=sink, recent=recent, allocator="pyramid", num_layers=3)
    with pytest.raises(InvalidArgument) as raised:
        start(session_request)
    assert raised.value.field == "budget.tokens"


# --- adaptive --------------------------------------------------------------------------------


def brute_force_adaptive(scores: list[np.ndarray], tokens: int, sink: int, recent: int) -> list[int]:
    """Head-averaged scores with protected tokens as +inf, each layer sorted; the floors take
    every layer's best, then the globally best of the rest fill the total."""
    floor = max(math.ceil(0.25 * tokens), sink + recent + 1)
    lengths = [s.shape[1] for s in scores]
    total = min(len(scores) * tokens, sum(lengths))
    budgets = [min(floor, n) for n in lengths]
    rest = []
    for layer, score in enumerate(scores):
        mean = score.astype(np.float64).mean(axis=0)
        mean[:sink] = np.inf
        mean[len(mean) - recent:] = np.inf
        ordered = sorted(mean.tolist(), reverse=True)
        rest += [(value, layer) for value in ordered[budgets[layer]:]]
    rest.sort(key=lambda item: -item[0])
    for _, layer in rest[: total - sum(budgets)]:
        budgets[layer] += 1
    return budgets


@pytest.mark.parametrize("seed", range(8))
def test_adaptive_keeps_the_globally_best_tokens_above_the_floors(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, heads = int(rng.integers(2, 9)), int(rng.integers(1, 5))
    tokens = int(rng.integers(8, 64))
    sink, recent = int(rng.integers(0, 3)), int(rng.integers(0, tokens // 2))
    lengths = rng.integers(1, 4 * tokens, layers)
    # Layers on very different scales, as CAOTE errors are.
    scores = [rng.exponential(1.0, (heads, n)) * 10.0 ** rng.uniform(-2, 2) for n in lengths]
    allocator = Adaptive(tokens, sink=sink, recent=recent)
    budgets = allocator.allocate([tokens] * layers, lengths.tolist(), scores)
    floor = max(math.ceil(ADAPTIVE_FLOOR_FRACTION * tokens), sink + recent + 1)
    assert allocator.floor == floor
    assert sum(budgets) == min(layers * tokens, int(lengths.sum()))
    assert all(min(floor, n) <= b <= n for b, n in zip(budgets, lengths))
    assert budgets == brute_force_adaptive(scores, tokens, sink, recent)


@pytest.mark.parametrize("layers,tokens", [(2, 7), (3, 24), (5, 100), (32, 128)])
def test_adaptive_totals_and_floors_with_long_caches(layers: int, tokens: int) -> None:
    rng = np.random.default_rng(layers)
    lengths = [layers * tokens] + [3 * tokens] * (layers - 1)
    scores = [rng.random((2, n)) for n in lengths]
    scores[0] *= 1e6  # one layer dominates (and can hold it all): the others drop to their floor
    budgets = Adaptive(tokens, recent=1).allocate([tokens] * layers, lengths, scores)
    floor = max(math.ceil(tokens / 4), 2)
    assert sum(budgets) == layers * tokens
    assert budgets[1:] == [floor] * (layers - 1)
    assert budgets[0] == layers * tokens - (layers - 1) * floor


def test_adaptive_keeps_everything_when_the_caches_fit() -> None:
    lengths = [5, 30, 12]
    scores = [np.ones((2, n)) for n in lengths]
    assert Adaptive(20).allocate([20] * 3, lengths, scores) == lengths


@pytest.mark.parametrize("wrapper", ["caote", "fastcaote"])
def test_adaptive_through_the_manager(wrapper: str) -> None:
    tokens, layers = 16, 4
    session = start(open_request("h2o", wrapper, budget=tokens, allocator="adaptive", num_layers=layers), seed=3)
    assert list(session.opened.layer_budgets) == [tokens] * layers
    floor = max(math.ceil(tokens / 4), tokens // 2 + 1)  # h2o: recent = tokens // 2, no sinks
    seen = set()
    for step, new in enumerate([40, 8, 8, 8, 8]):
        phase = pb.PHASE_PREFILL if step == 0 else pb.PHASE_DECODE
        before = [p.shape[1] for p in session.positions]
        response = session.report(new, phase)
        budgets = list(response.layer_budgets)
        assert sum(budgets) == layers * tokens
        assert all(b >= floor for b in budgets)
        seen.add(tuple(budgets))
        keeps = {keep.layer: keep for keep in response.keeps}
        for layer, budget in enumerate(budgets):
            length = before[layer] + new
            assert budget <= length
            if layer in keeps:
                assert keeps[layer].kept_tokens == budget and keeps[layer].cache_length == length
            else:
                assert length == budget
            assert session.positions[layer].shape[1] == budget
    assert any(b != (tokens,) * layers for b in seen), "never moved budget between layers"


@pytest.mark.parametrize("wrapper", ["", "none"])
@pytest.mark.parametrize("base", ["h2o", "tova", "snapkv"])
def test_adaptive_needs_a_caote_wrapper(base: str, wrapper: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        start(open_request(base, wrapper, budget=64, allocator="adaptive"))
    assert raised.value.field == "budget.allocator"
    assert "caote" in str(raised.value) and "comparable across layers" in str(raised.value)
