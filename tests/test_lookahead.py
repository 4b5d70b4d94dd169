"""Lookahead queries: before a prefill decision the session decodes pseudo tokens greedily on
its cache, observes with their queries, and leaves the cache exactly as it was."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import kvevict
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from tests.tiny_models import tiny_config


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def test_pseudo_tokens_are_the_greedy_continuation_and_leave_the_cache_as_it_was(monkeypatch):
    model = _model()
    prompt = torch.randint(3, 97, (48,), generator=torch.Generator().manual_seed(1))
    # The first decision comes after the whole prompt (budget 40 < 48): the cache is the full prompt.
    settings = EvictionSettings(policy=kvevict.policy("snapkv", window=4).spec(), budget=pb.BudgetSpec(tokens=40),
                                block_size=48, lookahead=3)
    seen = {}
    original = CacheSession._lookahead_queries

    def observed(self, count, question=None):
        before = [(e.keys, e.values) for e in self.cache.hf_cache.layers], list(self.cache._positions)
        greedy = []
        real_model = self.model

        def recording_forward(*args, **kwargs):
            output = real_model.__class__.__call__(real_model, *args, **kwargs)
            greedy.append(int(kwargs["input_ids"][0, 0]))
            return output

        self.model = recording_forward
        try:
            queries = original(self, count, question)
        finally:
            self.model = real_model
        after = [(e.keys, e.values) for e in self.cache.hf_cache.layers], list(self.cache._positions)
        seen.update(tokens=greedy, unchanged=all(a is b for pair in zip(before[0], after[0]) for a, b in zip(*pair))
                    and all(a is b for a, b in zip(before[1], after[1])), queries=queries)
        return queries

    monkeypatch.setattr(CacheSession, "_lookahead_queries", observed)
    session = CacheSession(model, EmbeddedManagerClient(), settings)
    try:
        session.prefill(prompt)
        assert session.stats.reports == 1 and session.cache.tokens_seen == 48
        assert max(int(p.max()) for p in session.cache._positions) == 47
    finally:
        session.close()
    plain = model.generate(prompt[None], max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert seen["tokens"] == plain[0, 48:].tolist()
    assert seen["unchanged"]
    layer0 = seen["queries"].layers[0]
    assert layer0.queries.shape[2] == 3 and layer0.positions.tolist() == [48, 49, 50]


def test_lookahead_changes_what_window_policies_keep_and_generation_runs_on():
    model = _model()
    prompt = torch.randint(3, 97, (120,), generator=torch.Generator().manual_seed(2))
    kept = []
    for lookahead in (0, 4):
        settings = EvictionSettings(policy=kvevict.policy("snapkv", window=4).spec(), budget=pb.BudgetSpec(tokens=24),
                                    block_size=16, lookahead=lookahead)
        session = CacheSession(model, EmbeddedManagerClient(), settings)
        try:
            logits = session.prefill(prompt)
            kept.append([p.clone() for p in session.cache._positions])
            for _ in range(5):
                logits = session.decode(int(torch.argmax(logits)))
            assert session.cache.tokens_seen == 125
        finally:
            session.close()
    assert any(not torch.equal(a, b) for a, b in zip(*kept))

