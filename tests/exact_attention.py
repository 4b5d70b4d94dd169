"""Exact attention arithmetic for brute-force oracles: softmax, the output change of evicting
each token alone and the leave-one-out deviation, in 80-digit decimals (no tests here)."""

from __future__ import annotations

import decimal

import numpy as np

# 80 significant digits: evicting a token of weight 1e-30 changes an output of norm 1 by 1e-31,
# beyond any float; exact decimal arithmetic keeps ~50 digits of that change.
_EXACT = decimal.Context(prec=80)


def softmax(logits: np.ndarray) -> list[decimal.Decimal]:
    """Exact-enough softmax of float logits, as decimals."""
    with decimal.localcontext(_EXACT):
        logits = [_EXACT.create_decimal(float(x)) for x in logits]
        top = max(logits)
        weights = [(x - top).exp() for x in logits]
        total = sum(weights)
        return [w / total for w in weights]


def _weighted_mean(a: list[decimal.Decimal], values: np.ndarray, skip: int) -> list[decimal.Decimal]:
    total = sum(w for i, w in enumerate(a) if i != skip)
    return [sum(w * _EXACT.create_decimal(float(values[i, k])) for i, w in enumerate(a) if i != skip) / total
            for k in range(values.shape[1])]


def _norm(vector: list[decimal.Decimal]) -> float:
    return float(_EXACT.sqrt(sum(x * x for x in vector)))


def brute_force_change(a: list[decimal.Decimal], values: np.ndarray) -> np.ndarray:
    """||o - o_without_j||: token j removed, the rest renormalised, the output recomputed."""
    with decimal.localcontext(_EXACT):
        o = _weighted_mean(a, values, skip=-1)
        return np.array([_norm([x - y for x, y in zip(o, _weighted_mean(a, values, skip=j))]) for j in range(len(a))])


def excluded_deviation(a: list[decimal.Decimal], values: np.ndarray) -> np.ndarray:
    """||v_j - o_{-j}|| from the other tokens alone (what the worker sends)."""
    with decimal.localcontext(_EXACT):
        return np.array([_norm([_EXACT.create_decimal(float(values[j, k])) - y
                                for k, y in enumerate(_weighted_mean(a, values, skip=j))]) for j in range(len(a))])


def as_float(a: list[decimal.Decimal]) -> np.ndarray:
    return np.array([float(x) for x in a])
