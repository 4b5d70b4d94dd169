"""CAOTE through the worker's attention, statistics and wire, then the manager, equals brute
force on heads at the extremes: a sink with 1 - 1e-9 of the mass (float32's softmax rounds it
to exactly 1), tokens at 1e-30, and uniform attention; inputs in float16 and float32, statistics
on the default wire and in float32. The sink is the head's most important token, not its least."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvevict import wire
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.cache_manager.wrappers import caote_scores
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.attention import COLLECTOR_KWARG, kvevict_attention
from kvevict.worker.statistics import PositionSource, Requirement, StatisticsCollector, to_wire
from tests.exact_attention import brute_force_change, softmax

LENGTH, DIM = 32, 8
HEADS = {
    "sink 1 - 1e-9": np.concatenate([[0.0], np.full(LENGTH - 1, np.log(1e-9 / (LENGTH - 1)))]),
    "tokens at 1e-30": np.concatenate([np.zeros(LENGTH // 2), np.full(LENGTH // 2, np.log(1e-30))]),
    "uniform": np.zeros(LENGTH),
}
# Relative error allowed per wire: float32 arithmetic (exp of -69 is good to ~4e-6), or two
# bfloat16 roundings (2^-8 each).
TOLERANCE = {tensor_pb2.DTYPE_FLOAT32: 1e-4, tensor_pb2.DTYPE_UNSPECIFIED: 2.0**-7 + 1e-4}


class _OneLayer(PositionSource):
    def positions(self, layer: int) -> torch.Tensor:
        return torch.arange(LENGTH)[None, :]

    def window(self, layer: int) -> int:
        return 0


def caote_through_the_worker(query, key, value, session_dtype: int) -> np.ndarray:
    """caote+tova's score of every token of the one-head layer, as the manager computes it from
    the worker's report."""
    requirements = [StatisticRequirement(pb.STATISTIC_ATTN_WINDOW, 1),
                    StatisticRequirement(pb.STATISTIC_VALUE_DEV_EXCLUDED, 1, pb.REFERENCE_WINDOW_ATTENTION, 1)]
    collector = StatisticsCollector([Requirement.from_proto(r.to_proto(session_dtype), session_dtype)
                                     for r in requirements], 1, _OneLayer())
    collector.start_period(1)
    kvevict_attention(SimpleNamespace(layer_idx=0), query, key, value, None, scaling=1.0,
                      **{COLLECTOR_KWARG: collector})
    decoded = [wire.decode(to_wire(statistic, req.dtype), "values")
               for statistic, req in zip(collector.layer_statistics(0, key, value), collector.requirements)]
    return caote_scores(decoded[0][0], decoded[1][0])


@pytest.mark.parametrize("session_dtype", TOLERANCE, ids=["f32-wire", "default-wire"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("head", HEADS)
def test_caote_equals_brute_force_at_the_extremes(head: str, model_dtype: torch.dtype, session_dtype: int) -> None:
    # One query, one head: q . k_j = the head's logit j (scaling 1).
    query = torch.zeros(1, 1, 1, DIM, dtype=model_dtype)
    query[..., 0] = 1.0
    key = torch.zeros(1, 1, LENGTH, DIM, dtype=model_dtype)
    key[0, 0, :, 0] = torch.from_numpy(HEADS[head])
    value = torch.randn(1, 1, LENGTH, DIM, generator=torch.Generator().manual_seed(1)).to(model_dtype)
    # Brute force on the numbers the model really holds (float16 rounds the logits and values).
    logits = key[0, 0, :, 0].double().numpy()
    brute = brute_force_change(softmax(logits), value[0, 0].double().numpy())
    got = caote_through_the_worker(query, key, value, session_dtype)
    error = np.max(np.abs(got - brute) / brute)
    print(f"{head}: max relative error {error:.1e}")
    assert error < TOLERANCE[session_dtype]
    assert np.argmax(got) == np.argmax(brute)
