"""Every supported architecture (README, "Supported architectures"), tiny and random: with the
full budget kvevict computes what plain transformers computes, with a small one every policy
runs and keeps the cache within budget + one block; the geometry it reads is the cache
transformers builds. Architectures it cannot run are refused with a clear error."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, FalconConfig

from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.cache_manager.policies.window_errors import WindowErrorPolicy
from kvevict.cache_manager.wrappers import WRAPPERS
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.attention import UnsupportedModel
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import geometry_of, load_model, model_from_config
from tests.tiny_models import SUPPORTED, WINDOW, tiny_config

PROMPT, BLOCK, NEW_TOKENS, BUDGET = 30, 8, 6, 10
README = Path(__file__).resolve().parent.parent / "README.md"
# How the README names each architecture of SUPPORTED.
README_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi-3",
                "gemma2": "Gemma 2", "gemma3": "Gemma 3", "gpt2": "GPT-2", "opt": "OPT", "gpt_neox": "GPT-NeoX",
                "gpt_bigcode": "GPT-BigCode"}


@functools.cache
def _models(name: str):
    """(config, kvevict model, plain transformers model with the same weights)."""
    arch, overrides = SUPPORTED[name]
    config = tiny_config(arch, **overrides)
    model = model_from_config(config, seed=11)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    stock.load_state_dict(model.state_dict())
    stock.eval()
    return config, model, stock


def _prompt(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(12))


def _settings(base: str, wrapper: str = "none", budget: int = 1000) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=1, recent_tokens=2),
                            budget=pb.BudgetSpec(tokens=budget), block_size=BLOCK)


@pytest.mark.parametrize("name", SUPPORTED)
def test_full_budget_equals_plain_transformers_and_the_geometry_is_its_cache(name):
    config, model, stock = _models(name)
    prompt = _prompt(config.vocab_size)
    with torch.no_grad():
        expected = stock.generate(prompt[None], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    # h2o measures attention (the float32 path), streaming measures none (the SDPA path).
    for base in ("h2o", "streaming"):
        result = EvictingGenerator(model, EmbeddedManagerClient(), _settings(base)).generate(
            prompt, NEW_TOKENS, keep_logits=True)
        assert result.token_ids == expected.sequences[0, PROMPT:].tolist(), base
        assert (torch.stack(result.step_logits) - torch.cat(expected.logits)).abs().max().item() < 1e-4, base
        assert result.summary.evicted_per_layer == [0] * len(result.summary.evicted_per_layer)
    # transformers' own cache for the same tokens: its shapes are the geometry, its bytes the summary's.
    cache = DynamicCache(config=config)
    with torch.no_grad():
        stock(input_ids=expected.sequences[:, :-1], past_key_values=cache, use_cache=True)
    geometry = geometry_of(model)
    assert len(cache.layers) == geometry.num_layers
    for layer in cache.layers:
        assert tuple(layer.keys.shape[1::2]) == (geometry.num_kv_heads, geometry.head_dim)
    windows = list(geometry.sliding_windows) or [0] * geometry.num_layers
    assert windows == [getattr(layer, "sliding_window", 0) for layer in cache.layers]
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)
    assert result.summary.full_cache_bytes == held


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_policy_runs_at_a_small_budget_within_budget_plus_one_block(name):
    config, model, _ = _models(name)
    prompt = _prompt(config.vocab_size)
    wrappers = list(WRAPPERS)
    for index, base in enumerate(BASE_POLICIES):
        wrapper = wrappers[index % len(wrappers)]  # every wrapper, over the bases
        if wrapper == "caote" and issubclass(BASE_POLICIES[base], WindowErrorPolicy):
            wrapper = "fastcaote"  # the window policies score output errors themselves: no CAOTE over them
        lengths = []
        result = EvictingGenerator(model, EmbeddedManagerClient(), _settings(base, wrapper, BUDGET)).generate(
            prompt, NEW_TOKENS, observer=lambda query, layers: lengths.extend(p.shape[1] for p in layers))
        assert len(result.token_ids) == NEW_TOKENS
        assert max(lengths) <= BUDGET + BLOCK, f"{base}+{wrapper}"
        assert sum(result.summary.evicted_per_layer) > 0, f"{base}+{wrapper}"


def test_the_readme_lists_every_supported_architecture():
    section = re.search(r"^## Supported architectures\n(.*?)^## ", README.read_text(), re.S | re.M)
    assert section is not None
    for arch, _ in SUPPORTED.values():
        assert README_NAMES[arch] in section.group(1), arch


def _tiny_falcon() -> FalconConfig:
    return FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        bos_token_id=1, eos_token_id=2)


def test_falcon_is_refused_with_a_clear_error_at_load(tmp_path):
    with pytest.raises(UnsupportedModel, match=r"FalconForCausalLM .*AttentionInterface.*Supported architectures"):
        model_from_config(_tiny_falcon())
    AutoModelForCausalLM.from_config(_tiny_falcon()).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="FalconForCausalLM"):
        load_model(str(tmp_path))


def test_a_session_on_a_falcon_model_is_refused():
    model = AutoModelForCausalLM.from_config(_tiny_falcon())
    with pytest.raises(UnsupportedModel, match="FalconForCausalLM"):
        CacheSession(model, EmbeddedManagerClient(), _settings("h2o"))


def test_multi_query_models_have_one_kv_head():
    assert geometry_of(tiny_config("gpt_bigcode")).num_kv_heads == 1
    assert geometry_of(tiny_config("gpt_bigcode", multi_query=False)).num_kv_heads == 4
    assert geometry_of(_tiny_falcon()).num_kv_heads == 1  # read right, though Falcon is refused
    assert list(geometry_of(tiny_config("gemma2")).sliding_windows) == [WINDOW, 0, WINDOW]
