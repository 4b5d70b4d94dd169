"""CAOTE's reference output is the paper's for every base: the output of the virtual query
whose attention is the base's own normalised score (METHODS.md), not a stand-in.

A tiny model (and one whose sliding-window layers drop what no query can see) is prefilled block by block through the worker and the real manager (statistics in
float32, evictions from the second block on). At every report, for every layer and KV head, the
manager's CAOTE score is compared with brute force: the base score the manager computed (H2O's
accumulator included), normalised to a, then ||o - o_without_j|| recomputed from the full cached
values with a renormalised. Exact for every base whose score the worker can reproduce; for
random, whose draws exist only on the manager, the mean value stands in: measured and shown not
to be exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvevict.cache_manager.policies.base import LayerContext
from kvevict.cache_manager.validation import validate_report
from kvevict.cache_manager.wrappers import normalised_attention
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from tests.caote_oracle import max_relative_error, output_change_without_each, rank_correlation
from tests.tiny_models import tiny_config

EXACT_BASES = ["h2o", "tova", "snapkv", "kvzip", "keydiff", "streaming", "valuenorm"]
POOL_KERNEL = {"kvzip": 1}  # kvzip scores each token alone; the others pool with 3
TOKENS, BLOCK, BUDGET = 96, 24, 40


class CheckingManager(EmbeddedManagerClient):
    """The embedded manager, recomputing each report's CAOTE scores against brute force first."""

    def __init__(self) -> None:
        super().__init__()
        self.session: CacheSession | None = None
        self.errors: list[float] = []
        self.correlations: list[float] = []

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        state = self.core.store.get(request.session_id)
        report = validate_report(request, state)
        policy = state.settings.policy()
        new = np.broadcast_to(report.positions.astype(np.int32), (state.settings.geometry.num_kv_heads, report.positions.size))
        for layer, statistics in enumerate(report.statistics):
            # Sliding layers: the leading tokens out of every later query's window leave both sides.
            dropped = report.dropped[layer] if report.dropped else 0
            previous = state.accumulators[layer][:, dropped:] if policy.accumulates else None
            accumulator = policy.accumulate(previous, statistics) if policy.accumulates else None
            positions = np.concatenate([state.positions[layer], new], axis=1)[:, dropped:]
            ctx = LayerContext(layer, request.sequence, positions, statistics, accumulator)
            a = normalised_attention(policy.base.attention_like(policy.base.score(ctx)))
            got = policy.score(ctx)
            # The worker's cache still holds the dropped tokens until the answer: the report's are the last.
            values = self.session.cache.keys_values(layer)[1][0, :, -positions.shape[1]:].double().numpy()
            for head in range(a.shape[0]):
                brute = output_change_without_each(a[head], values[head])
                self.errors.append(max_relative_error(got[head], brute))
                self.correlations.append(rank_correlation(got[head], brute))
        return super().report_block(request)


def check_caote(base: str, arch: str = "llama") -> CheckingManager:
    model = model_from_config(tiny_config(arch, initializer_range=0.1), seed=3)
    manager = CheckingManager()
    settings = EvictionSettings(policy=pb.PolicySpec(base=base, wrapper="caote", window=8,
                                                                 pool_kernel=POOL_KERNEL.get(base, 3)),
                                budget=pb.BudgetSpec(tokens=BUDGET), block_size=BLOCK,
                                statistics_dtype=tensor_pb2.DTYPE_FLOAT32)
    session = CacheSession(model, manager, settings)
    manager.session = session
    ids = torch.randint(3, model.config.vocab_size, (TOKENS,), generator=torch.Generator().manual_seed(0))
    session.prefill(ids)
    for token in range(8):  # decode reports too (H2O reports every block)
        session.decode(token + 3)
    session.close()
    assert session.stats.reports >= TOKENS // BLOCK - 1
    return manager


@pytest.mark.parametrize("arch", ["llama", "gemma3"], ids=["llama", "gemma3-sliding-window"])
@pytest.mark.parametrize("base", EXACT_BASES)
def test_caote_reference_is_the_virtual_query_of_the_base_score(base: str, arch: str) -> None:
    checked = check_caote(base, arch)
    print(f"caote+{base} on {arch}: max relative error vs brute force {max(checked.errors):.1e} "
          f"over {len(checked.errors)} heads x reports")
    assert max(checked.errors) < 1e-4


def test_random_reference_is_the_mean_value_an_approximation() -> None:
    checked = check_caote("random")
    print(f"caote+random: max relative error {max(checked.errors):.2f}, "
          f"Spearman median {np.median(checked.correlations):.3f}")
    assert max(checked.errors) > 1e-3  # not the virtual query's output
    assert np.median(checked.correlations) > 0.9  # yet it ranks tokens nearly alike
