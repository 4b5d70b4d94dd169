"""caote_scores is the exact output change of evicting one token (brute force, float64), and
stays finite / +inf (never NaN) on degenerate attention."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from kvevict.cache_manager import caote_scores


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def brute_force_change(a: np.ndarray, values: np.ndarray) -> np.ndarray:
    """||o - o_without_j|| with o_without_j = sum_{i != j} a_i v_i / (1 - a_j), one j at a time."""
    o = a @ values
    change = np.empty(len(a))
    for j in range(len(a)):
        others = np.arange(len(a)) != j
        o_without = (a[others] @ values[others]) / (1.0 - a[j])
        change[j] = np.linalg.norm(o - o_without)
    return change


@pytest.mark.parametrize("seed", range(5))
def test_caote_equals_brute_force_output_change(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = softmax(rng.normal(0.0, 2.0, 50))
    values = rng.normal(0.0, 1.0, (50, 16))
    o = a @ values
    value_dev = np.linalg.norm(values - o, axis=-1)
    brute = brute_force_change(a, values)
    got = caote_scores(a, value_dev)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - brute) / brute) < 1e-6
    # The normalisation makes the scale of the base score irrelevant.
    np.testing.assert_allclose(caote_scores(7.5 * a, value_dev), got, rtol=1e-12)


def test_fastcaote_uses_the_mean_value_and_differs_from_the_exact_change() -> None:
    rng = np.random.default_rng(11)
    a = softmax(rng.normal(0.0, 2.0, 50))
    values = rng.normal(0.0, 1.0, (50, 16)) + rng.normal(0.0, 1.0, 16)
    brute = brute_force_change(a, values)
    fast = caote_scores(a, np.linalg.norm(values - values.mean(axis=0), axis=-1))
    assert np.max(np.abs(fast - brute) / brute) > 1e-2
    expected = a / (1 - a) * np.linalg.norm(values - values.mean(axis=0), axis=-1)
    np.testing.assert_allclose(fast, expected, rtol=1e-12)


def test_caote_normalises_each_head_separately() -> None:
    rng = np.random.default_rng(3)
    h = rng.random((3, 20)) * np.array([[1.0], [10.0], [0.01]])
    dev = rng.random((3, 20))
    got = caote_scores(h, dev)
    for head in range(3):
        np.testing.assert_allclose(got[head], caote_scores(h[head], dev[head]), rtol=1e-12)


def test_degenerate_attention_gives_no_nan() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero or invalid-value warnings either
        uniform = caote_scores(np.zeros((2, 4)), np.array([[1.0, 2.0, 0.0, 4.0]] * 2))
        np.testing.assert_allclose(uniform, (0.25 / 0.75) * np.array([[1.0, 2.0, 0.0, 4.0]] * 2))
        one_hot = caote_scores(np.array([0.0, 3.0, 0.0]), np.array([1.0, 0.0, 2.0]))
        assert one_hot[1] == np.inf  # all the mass, even with zero deviation: must be kept
        np.testing.assert_array_equal(one_hot[[0, 2]], 0.0)
        assert caote_scores(np.array([[0.5]]), np.array([[0.0]]))[0, 0] == np.inf
        assert caote_scores(np.zeros((2, 0)), np.zeros((2, 0))).shape == (2, 0)
