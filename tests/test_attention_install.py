"""A model loaded with another attention (sdpa, eager) gets kvevict's for the time of a session:
it measures real statistics and decides exactly as a model loaded with kvevict's, and gets its
own attention back when the session closes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker import attention
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from tests.tiny_models import tiny_config


class RecordingManager(EmbeddedManagerClient):
    """The embedded manager, keeping every report it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[pb.ReportBlockRequest] = []

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        self.reports.append(request)
        return super().report_block(request)


def _settings() -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base="h2o", wrapper="caote", sink_tokens=1, recent_tokens=4),
                            budget=pb.BudgetSpec(tokens=16), block_size=8, statistics_dtype=tensor_pb2.DTYPE_FLOAT32)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_a_model_loaded_with_another_attention_decides_as_one_loaded_with_kvevicts(implementation):
    config = tiny_config("qwen2")
    loaded = model_from_config(config, seed=3)
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    plain.load_state_dict(loaded.state_dict())
    plain.eval()
    prompt = torch.randint(3, config.vocab_size, (50,), generator=torch.Generator().manual_seed(4))
    expected = EvictingGenerator(loaded, EmbeddedManagerClient(), _settings()).generate(prompt, 20, keep_logits=True)
    manager = RecordingManager()
    got = EvictingGenerator(plain, manager, _settings()).generate(prompt, 20, keep_logits=True)
    attention_sums = [wire.decode(layer.values[0], "attn") for report in manager.reports for layer in report.layers]
    assert all(np.asarray(values).sum() > 0 for values in attention_sums)  # measured, not zeros
    assert got.token_ids == expected.token_ids
    assert got.summary.evicted_per_layer == expected.summary.evicted_per_layer
    assert (torch.stack(got.step_logits) - torch.stack(expected.step_logits)).abs().max().item() < 1e-5
    assert plain.config._attn_implementation == implementation  # given back at close


def test_overlapping_sessions_restore_the_attention_when_the_last_one_closes():
    config = tiny_config("llama")
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    first = CacheSession(plain, EmbeddedManagerClient(), _settings())
    second = CacheSession(plain, EmbeddedManagerClient(), _settings())
    assert plain.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    first.close()
    assert plain.config._attn_implementation == attention.ATTN_IMPLEMENTATION  # `second` still runs
    second.close()
    assert plain.config._attn_implementation == "sdpa"


def test_a_session_that_fails_to_open_gives_the_attention_back():
    config = tiny_config("llama")
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    settings = _settings()
    settings.budget.tokens = 0  # refused by the manager
    with pytest.raises(Exception, match="budget.tokens"):
        CacheSession(plain, EmbeddedManagerClient(), settings)
    assert plain.config._attn_implementation == "sdpa"
