"""Generation through the worker: equal to transformers without eviction, bounded with it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from kvevict.worker.sampling import SamplingConfig
from tests.tiny_models import ARCHITECTURES, tiny_config


def _prompt(n: int, vocab: int, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _settings(base="tova", wrapper="caote", budget=1000, block=16, **policy) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base=base, wrapper=wrapper, **policy),
                            budget=pb.BudgetSpec(tokens=budget), block_size=block)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_budget_above_sequence_length_equals_transformers_greedy(arch):
    config = tiny_config(arch)
    model = model_from_config(config, seed=7)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    stock.load_state_dict(model.state_dict())
    stock.eval()
    prompt = _prompt(45, config.vocab_size)
    with torch.no_grad():
        expected = stock.generate(prompt[None], max_new_tokens=30, do_sample=False, min_new_tokens=30,
                                  output_logits=True, return_dict_in_generate=True)
    result = EvictingGenerator(model, EmbeddedManagerClient(), _settings("h2o")).generate(
        prompt, 30, keep_logits=True)
    assert result.token_ids == expected.sequences[0, 45:].tolist()
    assert result.summary.evicted_per_layer == [0] * config.num_hidden_layers
    got_logits = torch.stack(result.step_logits)
    assert (got_logits - torch.cat(expected.logits)).abs().max().item() < 1e-4


@pytest.mark.parametrize("base,wrapper", [("h2o", "none"), ("tova", "caote"), ("snapkv", "fastcaote"),
                                          ("streaming", "none"), ("random", "caote")])
def test_cache_never_exceeds_budget_plus_one_block_and_bytes_are_exact(base, wrapper):
    config = tiny_config("llama")
    model = model_from_config(config, seed=8)
    budget, block = 24, 8
    result = EvictingGenerator(model, EmbeddedManagerClient(), _settings(base, wrapper, budget, block, recent_tokens=4)).generate(
        _prompt(83, config.vocab_size), 37)
    summary = result.summary
    assert max(summary.peak_lengths) <= budget + block
    assert all(budget <= length <= budget + block for length in summary.final_lengths)
    seen = 83 + 36  # the last generated token is never fed
    assert summary.evicted_per_layer == [seen - length for length in summary.final_lengths]
    bytes_per_token = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 2 * 4
    assert summary.kv_bytes == sum(summary.final_lengths) * bytes_per_token
    assert summary.full_cache_bytes == seen * config.num_hidden_layers * bytes_per_token
    assert summary.peak_kv_bytes <= (budget + block) * config.num_hidden_layers * bytes_per_token


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    config = tiny_config("llama")
    model = model_from_config(config, seed=9)
    positions = []
    generator = EvictingGenerator(model, EmbeddedManagerClient(), _settings("streaming", "none", 20, 8, sink_tokens=4))
    generator.generate(_prompt(60, config.vocab_size), 1,
                       observer=lambda query, layers: positions.append(layers[0][0].tolist()))
    # Before the last forward the cache held the sinks plus the most recent tokens.
    last = positions[-1]
    assert last[:4] == [0, 1, 2, 3]
    assert last[4:] == list(range(last[4], 60))


def test_sampling_is_reproducible_per_seed_and_top_p_restricts_the_support():
    config = tiny_config("llama")
    model = model_from_config(config, seed=10)
    generator = EvictingGenerator(model, EmbeddedManagerClient(), _settings("tova", "none", 16, 8))
    prompt = _prompt(30, config.vocab_size)
    first = generator.generate(prompt, 20, SamplingConfig(temperature=1.0, seed=1)).token_ids
    again = generator.generate(prompt, 20, SamplingConfig(temperature=1.0, seed=1)).token_ids
    other = generator.generate(prompt, 20, SamplingConfig(temperature=1.0, seed=2)).token_ids
    assert first == again and first != other
    tiny_p = generator.generate(prompt, 20, SamplingConfig(temperature=1.0, top_p=1e-6, seed=3)).token_ids
    greedy = generator.generate(prompt, 20).token_ids
    assert tiny_p == greedy  # top-p that small leaves only the most likely token


def test_generation_stops_at_eos():
    config = tiny_config("llama")
    model = model_from_config(config, seed=11)
    generator = EvictingGenerator(model, EmbeddedManagerClient(), _settings())
    free = generator.generate(_prompt(20, config.vocab_size), 10).token_ids
    stopped = generator.generate(_prompt(20, config.vocab_size), 10, eos_token_ids={free[3]}).token_ids
    assert stopped == free[: free.index(free[3]) + 1]
