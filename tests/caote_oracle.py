"""Brute-force attention-output errors on a real model's attention, against CAOTE.

Runs a tiny model through the worker's real statistics path (a block prefill, statistics sent in
float32), captures the query/key/value tensors each layer's attention saw, and recomputes in
float64 what evicting each token alone does to the output, with the softmax renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr
from transformers import AttentionInterface

# x86-64 long double: 64-bit mantissa. The brute force needs it (see output_change_without_each).
assert np.finfo(np.longdouble).eps < 1e-18, "the brute-force oracle needs extended precision"

from kvevict import wire
from kvevict.cache_manager.wrappers import caote_scores, fast_caote_scores
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker import attention as kv_attention
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.model_loader import model_from_config


class StatisticsRecorder:
    """A manager that asks for fixed statistics, records the reports and never evicts."""

    def __init__(self, statistics: list[pb.StatisticRequirement]) -> None:
        self.statistics = statistics
        self.reports: list[pb.ReportBlockRequest] = []

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        self.num_layers = request.geometry.num_layers
        return pb.OpenSessionResponse(session_id="recorder", statistics=self.statistics, report_every_block=True,
                                      layer_budgets=[1 << 30] * self.num_layers,
                                      statistics_dtype=tensor_pb2.DTYPE_FLOAT32)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        self.reports.append(request)
        return pb.ReportBlockResponse(sequence=request.sequence, layer_budgets=[1 << 30] * self.num_layers)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(reports=len(self.reports))

    def statistic(self, layer: int, index: int) -> np.ndarray:
        return np.asarray(wire.decode(self.reports[-1].layers[layer].values[index], "values"), dtype=np.float64)


@dataclass
class CapturedAttention:
    query: np.ndarray  # (Hq, q, d) float64, RoPE applied
    key: np.ndarray  # (Hkv, L, d)
    value: np.ndarray  # (Hkv, L, d)
    scaling: float


def record_block(model, ids: torch.Tensor, statistics: list[pb.StatisticRequirement],
                 policy: str = "tova") -> tuple[StatisticsRecorder, list[CapturedAttention]]:
    """Prefills `ids` as one block through the worker, reporting `statistics` (each in its own
    dtype, float32 where it names none), and captures what every layer's attention saw."""
    recorder = StatisticsRecorder(statistics)
    captured: dict[int, CapturedAttention] = {}

    def spy(module, query, key, value, attention_mask, scaling=None, **kwargs):
        captured[module.layer_idx] = CapturedAttention(
            query[0].double().numpy(), key[0].double().numpy(), value[0].double().numpy(), scaling)
        return kv_attention.kvevict_attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(kv_attention.ATTN_IMPLEMENTATION, spy)
    try:
        settings = EvictionSettings(policy=pb.PolicySpec(base=policy), budget=pb.BudgetSpec(tokens=1 << 20),
                                    block_size=ids.numel(), statistics_dtype=tensor_pb2.DTYPE_FLOAT32)
        session = CacheSession(model, recorder, settings)
        session.prefill(ids)
        session.close()
    finally:
        kv_attention.register()
    return recorder, [captured[layer] for layer in range(len(captured))]


def run_block(config, window: int, tokens: int, seed: int = 0) -> tuple[StatisticsRecorder, list[CapturedAttention]]:
    """Prefills `tokens` random tokens of a random model of `config` as one block, asking for the
    window-`window` attention statistics in float32."""
    model = model_from_config(config, seed=seed)
    ids = torch.randint(3, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(seed))
    return record_block(model, ids, [
        pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_WINDOW, window=window),
        pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_EXCLUDED, window=window,
                                reference=pb.REFERENCE_WINDOW_ATTENTION, pool_kernel=1),
        pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_MEAN),
    ])


def softmax_rows(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.longdouble)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(axis=-1, keepdims=True)


def query_probs(att: CapturedAttention, head: int, queries: slice) -> np.ndarray:
    """Causal attention probabilities (q, L) of query head `head` (the block is the whole cache)."""
    group = att.query.shape[0] // att.key.shape[0]
    q = att.query[head, queries]
    k = att.key[head // group]
    length = k.shape[0]
    rows = np.arange(length)[queries]
    scores = q @ k.T * att.scaling
    scores = np.where(np.arange(length)[None, :] <= rows[:, None], scores, -np.inf)
    return softmax_rows(scores)


def output_change_without_each(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """||o - o_without_j|| for every j: token j removed, weights renormalised, output recomputed.

    probs (L,) attention of one (possibly virtual) query; values (L, d). Computed in extended
    precision: for a token with a_j ~ 1e-13 the change cancels ~13 digits, more than float64 holds.
    """
    probs = np.asarray(probs, dtype=np.longdouble)
    values = np.asarray(values, dtype=np.longdouble)
    output = probs @ values
    changes = np.empty(len(probs), dtype=np.longdouble)
    for j in range(len(probs)):
        rest = np.delete(probs, j)
        delta = output - rest @ np.delete(values, j, axis=0) / rest.sum()
        changes[j] = np.sqrt(np.sum(delta * delta))
    return changes.astype(np.float64)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(a, b).statistic)


def max_relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-30)))


def caote_from_report(recorder: StatisticsRecorder, layer: int, head: int, fast: bool = False) -> np.ndarray:
    attention = recorder.statistic(layer, 0)[head]
    if fast:
        return fast_caote_scores(attention, recorder.statistic(layer, 2)[head])
    return caote_scores(attention, recorder.statistic(layer, 1)[head])


def excluded_deviation_exact(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """||v_j - o_{-j}|| for every j in extended precision; probs (L,), values (L, d).

    o_{-j} = (S - a_j v_j) / (Z - a_j) cancels only for the heaviest token, whose o_{-j} is
    summed from the others directly.
    """
    a = np.asarray(probs, dtype=np.longdouble)
    v = np.asarray(values, dtype=np.longdouble)
    total, weighted = a.sum(), a @ v
    top = int(np.argmax(a))
    with np.errstate(invalid="ignore", divide="ignore"):
        without = (weighted[None, :] - a[:, None] * v) / (total - a)[:, None]
    others = np.arange(len(a)) != top
    without[top] = a[others] @ v[others] / a[others].sum()
    return np.sqrt(np.sum((v - without) ** 2, axis=-1)).astype(np.float64)


def group_last_query_probs(att: CapturedAttention, kv_head: int) -> np.ndarray:
    """The last query's attention (L,) averaged over the query heads of `kv_head`'s group."""
    group = att.query.shape[0] // att.key.shape[0]
    length = att.key.shape[1]
    return np.mean([query_probs(att, h, slice(length - 1, length))[0]
                    for h in range(kv_head * group, (kv_head + 1) * group)], axis=0)
