"""caote_scores is the exact output change of evicting one token (brute force), also where one
token holds nearly all the mass or almost none, and stays finite / +inf (never NaN) on
degenerate attention; fast_caote_scores is FastCAOTE's formula."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from kvevict.cache_manager import caote_scores
from kvevict.cache_manager.wrappers import fast_caote_scores
from tests.exact_attention import as_float, brute_force_change, excluded_deviation, softmax


@pytest.mark.parametrize("seed", range(5))
def test_caote_equals_brute_force_output_change(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = softmax(rng.normal(0.0, 2.0, 50))
    values = rng.normal(0.0, 1.0, (50, 16))
    brute = brute_force_change(a, values)
    got = caote_scores(as_float(a), excluded_deviation(a, values))
    assert got.dtype == np.float64
    assert np.max(np.abs(got - brute) / brute) < 1e-12
    # The normalisation makes the scale of the base score irrelevant.
    np.testing.assert_allclose(caote_scores(7.5 * as_float(a), excluded_deviation(a, values)), got, rtol=1e-12)


EXTREME_HEADS = {
    # A sink with all but 1e-9 of the mass: a/(1-a) * ||v - o|| is 0 * inf in float64.
    "sink 1 - 1e-9": np.concatenate([[0.0], np.full(31, np.log(1e-9 / 31))]),
    "tokens at 1e-30": np.concatenate([np.zeros(16), np.full(16, np.log(1e-30))]),
    "uniform": np.zeros(32),
}


@pytest.mark.parametrize("head", EXTREME_HEADS)
def test_caote_is_exact_at_the_extremes(head: str) -> None:
    rng = np.random.default_rng(5)
    a = softmax(EXTREME_HEADS[head])
    values = rng.normal(0.0, 1.0, (32, 8))
    brute = brute_force_change(a, values)
    got = caote_scores(as_float(a), excluded_deviation(a, values))
    assert np.max(np.abs(got - brute) / brute) < 1e-12
    assert np.argmax(got) == np.argmax(brute)


def test_the_old_form_evicts_the_sink_first_the_exact_form_keeps_it() -> None:
    """The float32 softmax rounds the sink to exactly 1 and o to its value: ||v - o|| = 0."""
    rng = np.random.default_rng(6)
    p32 = as_float(softmax(EXTREME_HEADS["sink 1 - 1e-9"])).astype(np.float32)
    assert p32[0] == 1.0
    values = rng.normal(0.0, 1.0, (32, 8)).astype(np.float32)
    o = p32 @ values
    a = p32.astype(np.float64) / p32.astype(np.float64).sum()
    old = a / (1 - a) * np.linalg.norm(values - o, axis=-1)
    assert np.argmin(old) == 0  # what used to happen
    new = caote_scores(p32, excluded_deviation(softmax(EXTREME_HEADS["sink 1 - 1e-9"]), values))
    assert np.argmax(new) == 0


def test_fastcaote_uses_the_mean_value_and_differs_from_the_exact_change() -> None:
    rng = np.random.default_rng(11)
    exact = softmax(rng.normal(0.0, 2.0, 50))
    values = rng.normal(0.0, 1.0, (50, 16)) + rng.normal(0.0, 1.0, 16)
    brute = brute_force_change(exact, values)
    a = as_float(exact)
    mean_deviation = np.linalg.norm(values - values.mean(axis=0), axis=-1)
    fast = fast_caote_scores(a, mean_deviation)
    assert np.max(np.abs(fast - brute) / brute) > 1e-2
    np.testing.assert_allclose(fast, a / (1 - a) * mean_deviation, rtol=1e-12)


def test_caote_normalises_each_head_separately() -> None:
    rng = np.random.default_rng(3)
    h = rng.random((3, 20)) * np.array([[1.0], [10.0], [0.01]])
    dev = rng.random((3, 20))
    got = caote_scores(h, dev)
    for head in range(3):
        np.testing.assert_allclose(got[head], caote_scores(h[head], dev[head]), rtol=1e-12)
        np.testing.assert_allclose(got[head], h[head] / h[head].sum() * dev[head], rtol=1e-12)


@pytest.mark.parametrize("scores", [caote_scores, fast_caote_scores])
def test_degenerate_attention_gives_no_nan(scores) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or invalid-value warnings either
        uniform = scores(np.zeros((2, 4)), np.array([[1.0, 2.0, 0.0, 4.0]] * 2))
        factor = 0.25 if scores is caote_scores else 0.25 / 0.75
        np.testing.assert_allclose(uniform, factor * np.array([[1.0, 2.0, 0.0, 4.0]] * 2))
        one_hot = scores(np.array([0.0, 3.0, 0.0]), np.array([1.0, 0.0, 2.0]))
        assert one_hot[1] == np.inf  # all the mass, even with zero deviation: must be kept
        np.testing.assert_array_equal(one_hot[[0, 2]], 0.0)
        assert scores(np.array([[0.5]]), np.array([[0.0]]))[0, 0] == np.inf
        assert scores(np.zeros((2, 0)), np.zeros((2, 0))).shape == (2, 0)
