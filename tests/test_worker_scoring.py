"""Teacher-forced scoring: plain log-softmax without eviction, the masked reference with it."""

from __future__ import annotations

import pytest
import torch

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from kvevict.worker.scoring import score_tokens
from tests.tiny_models import tiny_config
from tests.worker_doubles import VisibilityTrace, masked_full_forward

TOKENS = torch.randint(3, 97, (75,), generator=torch.Generator().manual_seed(2))


def _settings(budget: int) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base="snapkv", wrapper="caote", window=4, recent_tokens=4),
                            budget=pb.BudgetSpec(tokens=budget), block_size=16,
                            statistics_dtype=tensor_pb2.DTYPE_FLOAT32)


def _expected_logprobs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits[:-1].float(), dim=-1).gather(1, TOKENS[1:, None])[:, 0]


def test_scores_without_eviction_equal_a_plain_forward():
    model = model_from_config(tiny_config("qwen2"), seed=1)
    result = score_tokens(model, EmbeddedManagerClient(), _settings(budget=500), TOKENS)
    with torch.no_grad():
        logits = model(input_ids=TOKENS[None]).logits[0]
    assert result.token_logprobs.shape == (74,)
    assert (result.token_logprobs - _expected_logprobs(logits)).abs().max().item() < 1e-4
    assert result.summary.evicted_per_layer == [0, 0, 0]
    assert result.perplexity == pytest.approx(float(torch.exp(-result.token_logprobs.double().mean())))


def test_scores_with_eviction_equal_the_masked_full_cache_and_differ_from_the_full_cache():
    model = model_from_config(tiny_config("llama"), seed=2)
    trace = VisibilityTrace()
    result = score_tokens(model, EmbeddedManagerClient(), _settings(budget=20), TOKENS, observer=trace)
    assert min(result.summary.evicted_per_layer) > 0
    masked = masked_full_forward(model, TOKENS.tolist(), trace.masks(len(TOKENS)))
    assert (result.token_logprobs - _expected_logprobs(masked)).abs().max().item() < 1e-4
    with torch.no_grad():
        full = model(input_ids=TOKENS[None]).logits[0]
    assert (result.token_logprobs - _expected_logprobs(full)).abs().max().item() > 1e-3
