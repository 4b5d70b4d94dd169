"""`kvevict.EvictingCache` in `model.generate` and plain forwards: equal to `EvictingGenerator`
(the worker's own loop) token for token, equal to plain transformers when nothing is evicted,
memory really freed, conversations continued from the evicted cache, one sequence enforced."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

import kvevict
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from tests.tiny_models import tiny_config

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def _model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _prompt(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 97, (1, n), generator=torch.Generator().manual_seed(seed))


def _settings(policy: str, budget: int, block: int, allocator: str = "uniform") -> EvictionSettings:
    return EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=budget, allocator=allocator),
                            block_size=block)


@pytest.mark.parametrize("arch,policy,allocator,prompt_len,block", [
    ("llama", "caote+h2o", "uniform", 150, 32),
    ("llama", "tova", "pyramid", 129, 32),  # a last prefill block of one token
    ("llama", "snapkv", "uniform", 100, 16),
    ("qwen2", "fastcaote+keydiff", "adaptive", 90, 16),
    ("gemma3", "caote+tova", "uniform", 80, 16),  # sliding-window layers
    ("mistral", "random", "uniform", 60, 1),  # every block one token
    ("llama", "snapkv", "adahead", 100, 16),  # per-head budgets: a cache with a length per KV head
    ("qwen2", "caote+h2o", "global", 90, 16),
])
def test_generate_with_the_cache_equals_the_workers_generator(arch, policy, allocator, prompt_len, block):
    model, prompt, budget, new = _model(arch), _prompt(prompt_len), 24, 40
    with kvevict.EvictingCache(model, policy, budget, allocator=allocator, block_size=block) as cache:
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=new, **GREEDY)
        lengths, reports, heads = cache.layer_lengths, cache.summary().reports, cache.summary().final_head_lengths
    reference = EvictingGenerator(model, EmbeddedManagerClient(), _settings(policy, budget, block, allocator)).generate(
        prompt[0], new)
    assert out[0, prompt_len:].tolist() == reference.token_ids
    assert lengths == reference.summary.final_lengths
    assert heads == reference.summary.final_head_lengths and (allocator in ("adahead", "global")) == bool(heads)
    assert reports == reference.summary.reports > 0
    assert model.config._attn_implementation != "kvevict"  # given back at close


@pytest.mark.parametrize("policy", ["streaming", "tova"])
def test_a_budget_above_the_sequence_equals_plain_generate(policy):
    model, prompt = _model(), _prompt(70)
    plain = model.generate(prompt, max_new_tokens=30, **GREEDY)
    with kvevict.EvictingCache(model, policy, budget=4096, block_size=16) as cache:
        evicting = model.generate(prompt, past_key_values=cache, max_new_tokens=30, **GREEDY)
        assert cache.summary().evicted_per_layer == [0, 0, 0]
    assert torch.equal(plain, evicting)


def test_sampling_with_a_full_budget_equals_plain_sampling():
    model, prompt = _model(), _prompt(40)
    torch.manual_seed(11)
    plain = model.generate(prompt, max_new_tokens=25, do_sample=True, top_p=0.9, temperature=0.8, pad_token_id=0)
    with kvevict.EvictingCache(model, "streaming", budget=4096, block_size=16) as cache:
        torch.manual_seed(11)
        sampled = model.generate(prompt, past_key_values=cache, max_new_tokens=25, do_sample=True, top_p=0.9,
                                 temperature=0.8, pad_token_id=0)
    assert torch.equal(plain, sampled)


def test_memory_is_freed_and_positions_run_on_after_eviction():
    model, prompt = _model(), _prompt(200)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    with kvevict.EvictingCache(model, "caote+h2o", budget=32, block_size=32) as cache:
        model.generate(prompt, past_key_values=cache, max_new_tokens=10, **GREEDY)
        lengths = cache.layer_lengths
        held = sum(lengths) * config.num_key_value_heads * head_dim * 2 * 4  # keys + values, float32
        assert cache.kv_bytes() == held
        assert all(32 <= n <= 32 + 32 for n in lengths)
        assert cache.get_seq_length() == 200 + 9  # the last token is never fed
        assert cache.kv_bytes() < cache.full_cache_bytes() / 3
        assert max(int(p.max()) for p in cache._session.cache._positions) == 208


def test_a_long_plain_forward_is_prefilled_in_blocks_with_every_logit():
    model, prompt = _model(), _prompt(100)
    with kvevict.EvictingCache(model, "tova", budget=20, block_size=16) as cache:
        logits = model(prompt, past_key_values=cache).logits
        reports = cache.summary().reports
    blocks: list[torch.Tensor] = []
    session = CacheSession(model, EmbeddedManagerClient(), _settings("tova", 20, 16))
    try:
        session.prefill(prompt[0], on_block_logits=blocks.append)
    finally:
        session.close()
    assert logits.shape == (1, 100, model.config.vocab_size)
    assert torch.equal(logits[0], torch.cat(blocks))
    assert reports == session.stats.reports > 0


def test_a_conversation_continues_from_the_evicted_cache():
    """Turn 2 gets the whole history; only what the cache has not seen is fed, and the tokens
    equal a CacheSession fed the same tokens in the same order (prefill, decode, prefill, ...)."""
    model, first, second = _model(), _prompt(90, seed=1), _prompt(40, seed=2)
    with kvevict.EvictingCache(model, "caote+snapkv", budget=24, block_size=16) as cache:
        turn1 = model.generate(first, past_key_values=cache, max_new_tokens=20, **GREEDY)
        history = torch.cat([turn1, second], dim=1)
        turn2 = model.generate(history, past_key_values=cache, max_new_tokens=20, **GREEDY)
        assert cache.get_seq_length() == history.shape[1] + 19
    session = CacheSession(model, EmbeddedManagerClient(), _settings("caote+snapkv", 24, 16))
    try:
        expected = []
        for feed in (first[0], torch.cat([turn1[0, -1:], second[0]])):
            logits = session.prefill(feed)
            for _ in range(20):
                expected.append(int(torch.argmax(logits)))
                if len(expected) % 20:
                    logits = session.decode(expected[-1])
    finally:
        session.close()
    assert turn1[0, 90:].tolist() + turn2[0, history.shape[1]:].tolist() == expected


def test_a_conversation_with_a_full_budget_equals_one_long_prompt():
    model, first, second = _model(), _prompt(50, seed=1), _prompt(30, seed=2)
    with kvevict.EvictingCache(model, "tova", budget=4096, block_size=16) as cache:
        turn1 = model.generate(first, past_key_values=cache, max_new_tokens=12, **GREEDY)
        history = torch.cat([turn1, second], dim=1)
        turn2 = model.generate(history, past_key_values=cache, max_new_tokens=12, **GREEDY)
    assert torch.equal(turn2, model.generate(history, max_new_tokens=12, **GREEDY))


def test_streamers_and_stop_strings_work_on_a_real_tokenizer():
    model = AutoModelForCausalLM.from_pretrained("models/demo-py").eval()
    tokenizer = AutoTokenizer.from_pretrained("models/demo-py")
    inputs = tokenizer(open("examples/demo_prompt.py").read(), return_tensors="pt")
    n = inputs.input_ids.shape[1]

    def run(**extra) -> str:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        with kvevict.EvictingCache(model, "caote+h2o", budget=96, block_size=32) as cache:
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=40, do_sample=False,
                                 streamer=streamer, **extra)
            assert max(cache.layer_lengths) <= 96 + 32 < n
        text = tokenizer.decode(out[0, n:])
        assert "".join(streamer) == text
        return text

    whole = run()
    stop = whole[len(whole) // 2 :][:3]  # text the completion reaches halfway
    stopped = run(stop_strings=[stop], tokenizer=tokenizer)
    assert whole.startswith(stopped) and len(stopped) < len(whole) and stop in stopped


def test_one_sequence_only_with_clear_errors():
    model, prompt = _model(), _prompt(30)
    with kvevict.EvictingCache(model, "tova", budget=16, block_size=8) as cache:
        with pytest.raises(ValueError, match="num_beams"):
            model.generate(prompt, past_key_values=cache, max_new_tokens=4, num_beams=2, **GREEDY)
    with kvevict.EvictingCache(model, "tova", budget=16, block_size=8) as cache:
        with pytest.raises(ValueError, match="batch of 2"):
            model.generate(torch.cat([prompt, prompt]), past_key_values=cache, max_new_tokens=4, **GREEDY)
    with kvevict.EvictingCache(model, "tova", budget=16, block_size=8) as cache:
        mask = torch.ones_like(prompt)
        mask[0, 0] = 0
        with pytest.raises(ValueError, match="attention_mask: padding"):
            model.generate(prompt, attention_mask=mask, past_key_values=cache, max_new_tokens=4, **GREEDY)
    with kvevict.EvictingCache(model, "tova", budget=16, block_size=8) as cache:
        with pytest.raises(ValueError, match="position_ids"):
            model(prompt, past_key_values=cache, position_ids=torch.arange(5, 35)[None])


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="h2o+caote"), "the wrapper comes first"),
    (dict(policy="snapkv", budget=0), "budget: must be an integer > 0"),
    (dict(policy=kvevict.policy("h2o", sink=64)), "sink: 64 sink tokens need a budget above 64"),
    (dict(policy="tova", allocator="pyramidal"), "allocator: unknown allocator 'pyramidal'"),
    (dict(policy="tova", allocator="adaptive"), "allocator: "),  # CAOTE wrappers only
    (dict(policy="tova", statistics_dtype="int8"), "statistics_dtype: one of"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        kvevict.EvictingCache(model, **{"budget": 32, **kwargs})
    assert model.config._attn_implementation != "kvevict"  # nothing was installed


def test_a_dropped_cache_gives_the_model_back():
    model = _model()
    before = model.config._attn_implementation
    cache = kvevict.EvictingCache(model, "tova", budget=16, block_size=8)
    model.generate(_prompt(20), past_key_values=cache, max_new_tokens=3, **GREEDY)
    assert model.config._attn_implementation == "kvevict"
    del cache
    gc.collect()
    assert model.config._attn_implementation == before
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_a_remote_manager_decides_the_same(manager_factory):
    manager = manager_factory("memory://")
    model, prompt = _model(), _prompt(80)
    tokens = []
    for address in (None, manager.address):
        with kvevict.EvictingCache(model, "caote+tova", budget=20, block_size=16, manager=address) as cache:
            tokens.append(model.generate(prompt, past_key_values=cache, max_new_tokens=20, **GREEDY))
            assert not cache.summary().manager_fallback
    assert torch.equal(tokens[0], tokens[1])
