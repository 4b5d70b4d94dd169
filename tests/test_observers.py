"""Observer queries: the question's queries, captured from a forward of the question alone, as
every report's observation window. In the first layer a query depends only on its token and
position, so there the observers' attention over the context is exactly what the real question
pays the context once it is read after it (renormalised over the context); deeper layers see
the context and are an approximation, measured."""

from __future__ import annotations

import numpy as np
import torch

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.model_loader import model_from_config
from kvevict.v1 import tensor_pb2
from tests.caote_oracle import StatisticsRecorder, query_probs, rank_correlation, record_block
from tests.tiny_models import tiny_config

CONTEXT, QUESTION, WINDOW = 40, 6, 4


def observed_window_attention(model, ids: torch.Tensor) -> list[np.ndarray]:
    """ATTN_WINDOW[WINDOW] of one report of the context, observers = the question's queries."""
    recorder = StatisticsRecorder([pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_WINDOW, window=WINDOW)])
    settings = EvictionSettings(policy=pb.PolicySpec(base="snapkv"), budget=pb.BudgetSpec(tokens=1 << 20),
                                block_size=CONTEXT, statistics_dtype=tensor_pb2.DTYPE_FLOAT32)
    session = CacheSession(model, recorder, settings)
    session.observe_queries_of(ids[CONTEXT:], first_position=CONTEXT)
    session.prefill(ids[:CONTEXT])
    session.close()
    return [recorder.statistic(layer, 0) for layer in range(model.config.num_hidden_layers)]


def test_observers_pay_the_context_what_the_question_will_in_the_first_layer() -> None:
    model = model_from_config(tiny_config("llama", initializer_range=0.2), seed=1)
    ids = torch.randint(3, model.config.vocab_size, (CONTEXT + QUESTION,), generator=torch.Generator().manual_seed(2))
    observed = observed_window_attention(model, ids)
    # The real question, read after the context with the full cache (one block of everything).
    _, captured = record_block(model, ids, [pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_SUM)])
    correlations = []
    for layer, att in enumerate(captured):
        group = att.query.shape[0] // att.key.shape[0]
        for head in range(att.key.shape[0]):
            rows = [query_probs(att, h, slice(CONTEXT + QUESTION - WINDOW, CONTEXT + QUESTION))[:, :CONTEXT]
                    for h in range(head * group, (head + 1) * group)]
            real = np.mean([r / r.sum(axis=-1, keepdims=True) for r in rows], axis=0).sum(axis=0).astype(np.float64)
            if layer == 0:
                np.testing.assert_allclose(observed[layer][head], real, rtol=1e-4, atol=1e-7)
            else:
                correlations.append(rank_correlation(observed[layer][head], real))
    print(f"deeper layers: Spearman median {np.median(correlations):.3f} between observers and the real question")
    assert np.median(correlations) > 0


def test_without_observers_the_window_is_the_contexts_own_last_queries() -> None:
    model = model_from_config(tiny_config("llama", initializer_range=0.2), seed=1)
    ids = torch.randint(3, model.config.vocab_size, (CONTEXT + QUESTION,), generator=torch.Generator().manual_seed(2))
    recorder, captured = record_block(model, ids[:CONTEXT], [
        pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_WINDOW, window=WINDOW)])
    observed = observed_window_attention(model, ids)
    assert not np.allclose(recorder.statistic(0, 0), observed[0], rtol=1e-2)
