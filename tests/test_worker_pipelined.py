"""Pipelined reports: period n is decided while period n+1 runs and its masks apply one period
late. Decided on a thread, the generation equals the same lagged protocol run in order (an
executor that decides at once), the cache stays within the budget plus two blocks, the sums a
report carries after a late eviction are each token's own, and fail-open still works."""

from __future__ import annotations

from concurrent.futures import Executor, Future

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvevict
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.remote_manager import ManagerUnavailable
from kvevict.worker.statistics import Requirement, StatisticsCollector
from tests.tiny_models import tiny_config


class InOrder(Executor):
    """Decides at submit: the lagged protocol without a thread."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits, as a thread would
            future.set_exception(error)
        return future


class FailingFrom:
    """A manager that becomes unreachable from its `first_failure`-th report on."""

    def __init__(self, first_failure: int) -> None:
        self.inner, self.reports, self.first_failure = EmbeddedManagerClient(), 0, first_failure

    def open_session(self, request):
        return self.inner.open_session(request)

    def report_block(self, request):
        self.reports += 1
        if self.reports >= self.first_failure:
            raise ManagerUnavailable("gone")
        return self.inner.report_block(request)

    def close_session(self, request):
        return self.inner.close_session(request)


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch)).eval()


def _settings(policy: str, budget: int, block: int, pipelined: bool = True) -> EvictionSettings:
    return EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=budget),
                            block_size=block, pipelined=pipelined)


def _generate(model, settings, prompt, new, manager=None, decisions=None):
    return EvictingGenerator(model, manager or EmbeddedManagerClient(), settings, decisions=decisions).generate(
        prompt, new)


@pytest.mark.parametrize("arch,policy", [("llama", "caote+h2o"), ("llama", "snapkv"), ("qwen2", "fastcaote+keydiff"),
                                         ("gemma3", "caote+tova"), ("mistral", "tova")])
def test_decided_on_a_thread_equals_the_lagged_protocol_in_order(arch, policy):
    model = _model(arch)
    prompt = torch.randint(3, 97, (140,), generator=torch.Generator().manual_seed(1))
    budget, block = 24, 16
    threaded = _generate(model, _settings(policy, budget, block), prompt, 60)
    in_order = _generate(model, _settings(policy, budget, block), prompt, 60, decisions=InOrder())
    assert threaded.token_ids == in_order.token_ids
    assert threaded.summary.final_lengths == in_order.summary.final_lengths
    assert threaded.summary.reports == in_order.summary.reports > 0
    # One period late: above one block over the budget at some point, never above two.
    assert max(threaded.summary.peak_lengths) > budget + block
    assert all(peak <= budget + 2 * block for peak in threaded.summary.peak_lengths)
    synchronous = _generate(model, _settings(policy, budget, block, pipelined=False), prompt, 60)
    assert all(peak <= budget + block for peak in synchronous.summary.peak_lengths)


def test_fail_open_in_a_pipelined_session_goes_on_in_process():
    model = _model("llama")
    prompt = torch.randint(3, 97, (120,), generator=torch.Generator().manual_seed(2))
    runs = [_generate(model, _settings("caote+h2o", 24, 16), prompt, 40, manager=FailingFrom(4), decisions=executor)
            for executor in (None, InOrder())]
    assert runs[0].token_ids == runs[1].token_ids
    assert runs[0].summary.manager_fallback and runs[1].summary.manager_fallback
    assert all(peak <= 24 + 32 for peak in runs[0].summary.peak_lengths)


def test_sums_follow_the_columns_an_eviction_keeps():
    """A report built after an eviction (the previous period's late decision) reads, for every
    token still cached, the sums its own column got."""

    class Cache:
        def __init__(self, positions):
            self._positions = positions

        def positions(self, layer):
            return self._positions

        def window(self, layer):
            return 0

    heads, length = 2, 12
    requirements = [Requirement(pb.STATISTIC_ATTN_SUM, dtype=1), Requirement(pb.STATISTIC_ATTN_WINDOW, window=3, dtype=1),
                    Requirement(pb.STATISTIC_VALUE_DEV_EXCLUDED, reference=pb.REFERENCE_ACCUMULATED_ATTENTION, dtype=1)]
    cache = Cache(torch.arange(length).expand(heads, -1).contiguous())
    collector = StatisticsCollector(requirements, 1, cache)
    collector.start_period(4)
    probs = torch.softmax(torch.randn(heads, 2, 4, length, generator=torch.Generator().manual_seed(3)), dim=-1)
    collector.record_attention(0, probs)
    keys, values = torch.randn(1, heads, length, 8), torch.randn(1, heads, length, 8)
    full = collector.layer_statistics(0, keys, values)
    index = torch.tensor([[0, 2, 3, 7, 10, 11], [1, 2, 5, 6, 9, 11]])
    cache._positions = torch.gather(cache._positions, 1, index)
    collector.columns_kept(0, index, length, cache._positions)
    kept_keys = keys.gather(2, index[None, :, :, None].expand(-1, -1, -1, 8))
    kept_values = values.gather(2, index[None, :, :, None].expand(-1, -1, -1, 8))
    after = collector.layer_statistics(0, kept_keys, kept_values)
    for before, now in zip(full[:2], after[:2]):
        assert torch.equal(now, before.gather(1, index))
    # The CAOTE reference over the accumulated attention: the kept tokens' own accumulated sums.
    expected = StatisticsCollector(requirements, 1, cache)
    expected._layers[0].accumulated = probs.mean(dim=1).sum(dim=1).gather(1, index)
    expected._layers[0].accumulated_positions = cache._positions
    assert torch.equal(after[2], expected.layer_statistics(0, kept_keys, kept_values)[2])


def test_the_worker_loop_and_score_flush_the_last_decision():
    model = _model("llama")
    prompt = torch.randint(3, 97, (96,), generator=torch.Generator().manual_seed(4))
    result = _generate(model, _settings("tova", 24, 16), prompt, 1)
    # The prompt's last period was decided and applied before the summary.
    assert max(result.summary.final_lengths) <= 24 + 16
