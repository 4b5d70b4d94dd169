"""Sliding-window layers: the per-layer mask honours the window by absolute position."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from tests.tiny_models import tiny_config


def test_sliding_window_model_equals_transformers_without_eviction():
    config = tiny_config("mistral")
    config.sliding_window = 12  # shorter than the prompt: the window really cuts
    model = model_from_config(config, seed=6)
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    stock.load_state_dict(model.state_dict())
    stock.eval()
    prompt = torch.randint(3, config.vocab_size, (40,), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = stock.generate(prompt[None], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    settings = EvictionSettings(policy=pb.PolicySpec(base="h2o"), budget=pb.BudgetSpec(tokens=1000), block_size=8)
    result = EvictingGenerator(model, EmbeddedManagerClient(), settings).generate(prompt, 12, keep_logits=True)
    assert result.token_ids == expected.sequences[0, 40:].tolist()
    assert (torch.stack(result.step_logits) - torch.cat(expected.logits)).abs().max().item() < 1e-4
    with torch.no_grad():  # guard: without the window the logits differ
        config.sliding_window = None
        unwindowed = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
        unwindowed.load_state_dict(model.state_dict())
        full = unwindowed(input_ids=prompt[None]).logits[0, -1]
    assert (result.step_logits[0] - full).abs().max().item() > 1e-3
