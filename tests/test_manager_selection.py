"""Protection and selection: sinks and recent tokens survive (0 allowed), ties go to the most
recent token, StreamingLLM keeps sinks + the newest tokens, random is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict.cache_manager.selection import select_keep
from kvevict.v1 import cache_manager_pb2 as pb
from tests.test_manager_support import open_request, reference_keep, start


@pytest.mark.parametrize("seed", range(20))
def test_select_keep_matches_a_full_sort(seed: int) -> None:
    rng = np.random.default_rng(seed)
    heads, length = int(rng.integers(1, 5)), int(rng.integers(2, 80))
    budget = int(rng.integers(1, length + 5))
    sink = int(rng.integers(0, budget))
    recent = int(rng.integers(0, budget - sink))
    # Few distinct values, so ties are common.
    scores = rng.integers(0, 6, (heads, length)).astype(np.float64)
    columns = np.arange(length)
    protected = np.broadcast_to((columns < sink) | (columns >= length - recent), (heads, length))
    keep = select_keep(scores, budget, sink, recent)
    np.testing.assert_array_equal(keep, reference_keep(scores, protected, budget))
    assert (keep.sum(axis=-1) == min(budget, length)).all()


def test_ties_keep_the_most_recent_tokens() -> None:
    keep = select_keep(np.zeros((2, 10)), 4, sink=1, recent=0)
    np.testing.assert_array_equal(np.nonzero(keep[0])[0], [0, 7, 8, 9])
    np.testing.assert_array_equal(keep[0], keep[1])


def test_infinite_scores_do_not_displace_protected_tokens() -> None:
    scores = np.array([[np.inf, np.inf, np.inf, 0.0, 0.0, 0.0]])
    keep = select_keep(scores, 3, sink=0, recent=2)
    np.testing.assert_array_equal(keep[0], [False, False, True, False, True, True])


@pytest.mark.parametrize("sink,recent", [(0, 0), (2, 0), (0, 2), (2, 2)])
def test_protected_tokens_survive_even_with_zero_attention(sink: int, recent: int) -> None:
    session = start(open_request("tova", budget=12, sink=sink, recent=recent))

    def attention(layer, req, shape):
        # The two oldest and the two newest cached tokens get no attention, the rest equal mass,
        # so only protection can keep those four.
        values = np.ones(shape)
        values[:, :2] = 0.0
        values[:, -2:] = 0.0
        return values

    session.report(8, values=attention)
    for _ in range(3):
        session.report(8, values=attention)
        newest = np.arange(session.next_position - 2, session.next_position)
        for positions in session.positions:
            assert positions.shape == (2, 12)
            assert np.isin([0, 1], positions).all() == (sink == 2), positions
            assert np.isin(newest, positions).all() == (recent == 2), positions
            assert not np.isin(newest, positions).any() or recent == 2


def test_h2o_without_attention_keeps_the_newest_tokens() -> None:
    session = start(open_request("h2o", budget=10, sink=2, recent=0))
    for _ in range(3):
        session.report(6, values=lambda layer, req, shape: np.zeros(shape))
    expected = np.concatenate([[0, 1], np.arange(session.next_position - 8, session.next_position)])
    for positions in session.positions:
        np.testing.assert_array_equal(positions, np.broadcast_to(expected, positions.shape))


def test_streaming_keeps_exactly_the_sinks_and_the_newest_tokens() -> None:
    session = start(open_request("streaming", budget=16), seed=4)
    assert len(session.opened.statistics) == 0  # needs no statistics at all
    assert session.core.store.get(session.id).settings.sink == 4  # the StreamingLLM default
    for new in (10, 10, 3, 1, 7):
        session.report(new, pb.PHASE_DECODE)
    expected = np.concatenate([np.arange(4), np.arange(session.next_position - 12, session.next_position)])
    for positions in session.positions:
        np.testing.assert_array_equal(positions, np.broadcast_to(expected, positions.shape))


def _random_run(seed: int) -> list[bytes]:
    session = start(open_request("random", budget=10, seed=seed))
    return [session.report(n).SerializeToString() for n in (8, 8, 4, 4)]


def test_random_is_reproducible_per_seed_and_differs_across_seeds() -> None:
    first = _random_run(5)
    assert first == _random_run(5)
    assert first != _random_run(6)
    # Layers draw independently too.
    session = start(open_request("random", budget=10, seed=5))
    session.report(30)
    assert not np.array_equal(session.positions[0], session.positions[1])


def test_a_cache_at_budget_evicts_nothing_and_one_more_token_evicts_one() -> None:
    session = start(open_request("tova", budget=12))
    at_budget = session.report(12)
    assert not at_budget.keeps and at_budget.evicted_tokens == 0
    over = session.report(1)
    assert [k.layer for k in over.keeps] == [0, 1, 2]
    assert over.evicted_tokens == 1 * 3 * 2
