"""Statistics are measured beside the model: with nothing evicted, the logits of every policy
that needs only some queries' probabilities (window policies) or none are the full cache's bit
for bit, and computing probabilities only for the queries a statistic needs reports exactly
what computing them for every query does. (Policies that need every query's probabilities take
the output from the same float32 pass; tests/test_worker_generation.py checks their tokens.)"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvevict
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.statistics import StatisticsCollector
from tests.tiny_models import tiny_config

# Every policy whose statistics need no query's probabilities or only a window's.
POLICIES = ("tova", "snapkv", "keydiff", "caote+tova", "caote+snapkv", "fastcaote+snapkv", "caote+keydiff", "tova-mean",
            "streaming", "valuenorm", "random")


def _model(arch: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _logits(model, settings: EvictionSettings, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    blocks: list[torch.Tensor] = []
    session = CacheSession(model, EmbeddedManagerClient(), settings)
    try:
        logits = session.prefill(prompt, on_block_logits=blocks.append)
        for _ in range(steps):
            logits = session.decode(int(torch.argmax(logits)))
            blocks.append(logits[None])
    finally:
        session.close()
    return torch.cat(blocks)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_with_nothing_evicted_window_policies_give_the_full_caches_logits(arch):
    model = _model(arch)
    prompt = torch.randint(3, 97, (70,), generator=torch.Generator().manual_seed(1))
    full = _logits(model, EvictionSettings(policy=pb.PolicySpec(base="streaming", sink_tokens=0, recent_tokens=0),
                                           budget=pb.BudgetSpec(tokens=4096), block_size=16), prompt, 20)
    for policy in POLICIES:
        settings = EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=4096),
                                    block_size=16)
        assert torch.equal(_logits(model, settings, prompt, 20), full), policy


class Recording:
    def __init__(self) -> None:
        self.inner, self.reports = EmbeddedManagerClient(), []

    def open_session(self, request):
        return self.inner.open_session(request)

    def report_block(self, request):
        copy = pb.ReportBlockRequest.FromString(request.SerializeToString())
        copy.session_id = ""  # a new one per session
        self.reports.append(copy.SerializeToString())
        return self.inner.report_block(request)

    def close_session(self, request):
        return self.inner.close_session(request)


@pytest.mark.parametrize("policy", ["tova", "snapkv", "caote+snapkv", "caote+tova", "fastcaote+snapkv"])
def test_window_statistics_from_the_needed_queries_equal_those_from_every_query(policy, monkeypatch):
    model = _model()
    prompt = torch.randint(3, 97, (90,), generator=torch.Generator().manual_seed(2))
    settings = EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=24), block_size=16)
    runs = []
    for every_query in (False, True):
        if every_query:
            monkeypatch.setattr(StatisticsCollector, "first_needed_query", lambda self, layer, q_len: 0)
        manager = Recording()
        session = CacheSession(model, manager, settings)
        try:
            logits = session.prefill(prompt)
            for _ in range(40):
                logits = session.decode(int(torch.argmax(logits)))
        finally:
            session.close()
        runs.append(manager.reports)
    assert len(runs[0]) > 3 and runs[0] == runs[1]
