"""The worker's pruned cache is exactly a masked full cache, for real architectures."""

from __future__ import annotations

import pytest
import torch

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from tests.tiny_models import ARCHITECTURES, tiny_config
from tests.worker_doubles import RandomKeepManager, VisibilityTrace, masked_full_forward

PROMPT_TOKENS, BLOCK, NEW_TOKENS = 70, 16, 21


def _settings(base: str = "h2o", wrapper: str = "caote", budget: int = 24) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=2, recent_tokens=4),
                            budget=pb.BudgetSpec(tokens=budget), block_size=BLOCK,
                            statistics_dtype=tensor_pb2.DTYPE_FLOAT32)


def _run_and_replay(model, manager, settings):
    prompt = torch.randint(3, model.config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1))
    trace = VisibilityTrace()
    result = EvictingGenerator(model, manager, settings).generate(
        prompt, NEW_TOKENS, observer=trace, keep_logits=True)
    sequence = prompt.tolist() + result.token_ids[:-1]
    reference = masked_full_forward(model, sequence, trace.masks(len(sequence)))
    # Step i's logits predicted position PROMPT_TOKENS + i from position PROMPT_TOKENS - 1 + i.
    expected = reference[PROMPT_TOKENS - 1:]
    return torch.stack(result.step_logits), expected, result


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pruned_cache_equals_masked_full_cache_with_different_budgets_per_layer(arch):
    model = model_from_config(tiny_config(arch), seed=3)
    manager = RandomKeepManager(layer_budgets=[20, 33, 27])
    got, expected, result = _run_and_replay(model, manager, _settings())
    assert result.summary.final_lengths != [result.summary.final_lengths[0]] * 3  # lengths differ per layer
    assert min(result.summary.evicted_per_layer) > 0
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("base,wrapper", [("h2o", "caote"), ("snapkv", "fastcaote"), ("keydiff", "none")])
def test_pruned_cache_equals_masked_full_cache_under_real_policies(arch, base, wrapper):
    model = model_from_config(tiny_config(arch), seed=4)
    got, expected, result = _run_and_replay(model, EmbeddedManagerClient(), _settings(base, wrapper))
    assert min(result.summary.evicted_per_layer) > 0
    assert (got - expected).abs().max().item() < 1e-4


def test_eviction_changes_the_output():
    """Guards the test above: a mask that ignored eviction would not match."""
    model = model_from_config(tiny_config("llama"), seed=3)
    got, _, _ = _run_and_replay(model, RandomKeepManager(layer_budgets=[20, 33, 27]), _settings())
    prompt = torch.randint(3, model.config.vocab_size, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=prompt[None]).logits[0, -1]
    assert (got[0] - full).abs().max().item() > 1e-3


# PyramidKV's top layer keeps (B - recent) / 20 + recent: B = 64 leaves room for the protected 6.
@pytest.mark.parametrize("allocator,budget", [("pyramid", 64), ("adaptive", 24)])
def test_pruned_cache_equals_masked_full_cache_under_non_uniform_allocators(allocator, budget):
    model = model_from_config(tiny_config("llama"), seed=5)
    settings = _settings("tova", "caote", budget=budget)
    settings.budget.allocator = allocator
    got, expected, result = _run_and_replay(model, EmbeddedManagerClient(), settings)
    assert sum(result.summary.layer_budgets) == 3 * budget
    assert len(set(result.summary.layer_budgets)) > 1  # budgets really differ between layers
    assert (got - expected).abs().max().item() < 1e-4
