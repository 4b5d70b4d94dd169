"""The worker's per-head cache (OpenSessionResponse.per_head_budgets): every KV head keeps its own
number of tokens, freed for real. Checked against a masked full-cache forward (logits), against
the rectangular worker on the same keeps (every statistic, equal counts per head), and for the
bytes it holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from tests.tiny_models import tiny_config
from tests.worker_doubles import masked_full_forward

STATISTICS = [
    pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_SUM),
    pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_WINDOW, window=4),
    pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_MEAN),
    pb.StatisticRequirement(statistic=pb.STATISTIC_KEY_COSINE),
    pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_EXCLUDED, window=4,
                            reference=pb.REFERENCE_WINDOW_ATTENTION, pool_kernel=3),
    pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_EXCLUDED, reference=pb.REFERENCE_ACCUMULATED_ATTENTION),
    pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_EXCLUDED, reference=pb.REFERENCE_POSITION),
    pb.StatisticRequirement(statistic=pb.STATISTIC_QUERY_EVICT_ERROR, window=4),
    pb.StatisticRequirement(statistic=pb.STATISTIC_QUERY_KEY_ERROR, window=4),
    pb.StatisticRequirement(statistic=pb.STATISTIC_QUERY_PROJECTED_ERROR, window=4),
]


class HeadKeepManager:
    """Scripted decisions: each report keeps a random subset of every head, `counts(layer, head,
    length)` tokens of it. Per-head mode answers as a per-head session; otherwise (equal counts)
    as a rectangular one. Records the statistics it was sent, split per (layer, head)."""

    def __init__(self, per_head: bool, counts, seed: int = 0, statistics=STATISTICS) -> None:
        self.per_head, self.counts, self.statistics = per_head, counts, statistics
        self.rng = np.random.default_rng(seed)
        self.received: list[dict[tuple[int, int], list[np.ndarray]]] = []
        self.tracked: dict[tuple[int, int], int] = {}

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        self.geometry = request.geometry
        layers, heads = request.geometry.num_layers, request.geometry.num_kv_heads
        return pb.OpenSessionResponse(session_id="scripted", statistics=self.statistics, report_every_block=True,
                                      layer_budgets=[10**6] * layers, statistics_dtype=tensor_pb2.DTYPE_FLOAT32,
                                      per_head_budgets=self.per_head, head_budgets=[10**6] * (layers * heads)
                                      if self.per_head else [])

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        heads = self.geometry.num_kv_heads
        new = wire.decode(request.positions, "positions").size
        received, keeps = {}, []
        for stats in request.layers:
            if self.per_head:
                lengths = list(stats.head_lengths)
                assert stats.cache_length == sum(lengths)
                for h, n in enumerate(lengths):  # every new token entered every head
                    assert n == self.tracked.get((stats.layer, h), 0) + new
            else:
                lengths = [stats.cache_length] * heads
            values = [wire.decode(t, "values") for t in stats.values]
            for h in range(heads):
                start = sum(lengths[:h])
                received[stats.layer, h] = [v[start:start + lengths[h]] if self.per_head else v[h] for v in values]
            kept = [self.counts(stats.layer, h, lengths[h]) for h in range(heads)]
            masks = [np.zeros(n, bool) for n in lengths]
            for mask, k in zip(masks, kept):
                mask[self.rng.choice(mask.size, size=k, replace=False)] = True
            for h in range(heads):
                self.tracked[stats.layer, h] = kept[h]
            if self.per_head:
                keeps.append(pb.LayerKeep(layer=stats.layer, cache_length=sum(lengths), kept_tokens=sum(kept),
                                          keep=wire.encode_bits(np.concatenate(masks)), head_lengths=lengths,
                                          head_kept=kept))
            else:
                keeps.append(pb.LayerKeep(layer=stats.layer, cache_length=lengths[0], kept_tokens=kept[0],
                                          keep=wire.encode_bits(np.stack(masks))))
        self.received.append(received)
        layers = len(request.layers)
        return pb.ReportBlockResponse(sequence=request.sequence, keeps=keeps, layer_budgets=[10**6] * layers,
                                      head_budgets=[10**6] * (layers * heads) if self.per_head else [])

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(reports=len(self.received))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def _uneven(layer: int, head: int, length: int) -> int:
    """Different counts per head and layer, each keeping at least one token."""
    return max(1, min(length, [7, 13, 22][(layer + head) % 3] + 3 * head))


def _run(model, manager, prompt: torch.Tensor, steps: int, observer=None, block_size: int = 8):
    settings = EvictionSettings(policy=pb.PolicySpec(base="h2o"), budget=pb.BudgetSpec(tokens=16),
                                block_size=block_size)
    session = CacheSession(model, manager, settings, observer=observer)
    logits = [session.prefill(prompt)]
    tokens = prompt.tolist()
    for _ in range(steps):
        token = int(torch.argmax(logits[-1]))
        tokens.append(token)
        logits.append(session.decode(token))
    return session, tokens, torch.stack(logits)


class HeadTrace:
    """What every query of every forward could see, per (layer, KV head)."""

    def __init__(self) -> None:
        self.steps = []

    def __call__(self, queries: torch.Tensor, layers: list) -> None:
        self.steps.append((queries.clone(), [[row.clone() for row in heads] for heads in layers]))

    def masks(self, total: int) -> list[torch.Tensor]:
        heads = len(self.steps[0][1][0])
        masks = [torch.zeros(heads, total, total, dtype=torch.bool) for _ in self.steps[0][1]]
        for queries, layers in self.steps:
            for layer, rows in enumerate(layers):
                for h, positions in enumerate(rows):
                    r, c = torch.meshgrid(queries, positions, indexing="ij")
                    masks[layer][h, r, c] = True
        causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
        return [m & causal for m in masks]


def test_uneven_heads_give_the_logits_of_a_full_forward_masked_head_by_head():
    model = _model()
    prompt = torch.randint(3, 97, (37,), generator=torch.Generator().manual_seed(3))
    trace = HeadTrace()
    manager = HeadKeepManager(per_head=True, counts=_uneven)
    session, tokens, logits = _run(model, manager, prompt, steps=19, observer=trace)
    try:
        lengths = [session.cache.head_lengths(layer) for layer in range(3)]
        assert any(len(set(row)) > 1 for row in lengths), lengths  # the heads really differ
        # The last forward's logits are those of the last decode step (position len(tokens) - 1).
        reference = masked_full_forward(model, tokens, trace.masks(len(tokens)))
        assert torch.allclose(logits[-1], reference[-1], rtol=1e-4, atol=1e-5)
        # Every decode step's logits: the position it fed.
        for step in range(1, logits.shape[0]):
            assert torch.allclose(logits[step], reference[len(prompt) - 1 + step], rtol=1e-4, atol=1e-5), step
        assert torch.allclose(logits[0], reference[len(prompt) - 1], rtol=1e-4, atol=1e-5)
    finally:
        session.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_per_head_statistics_equal_the_rectangular_workers_on_the_same_keeps(seed):
    """Equal counts per head, so the rectangular worker can apply the same keeps: every
    statistic the per-head worker sends, head by head, is the rectangular one's row."""
    model = _model()
    prompt = torch.randint(3, 97, (29,), generator=torch.Generator().manual_seed(seed))

    def even(layer: int, head: int, length: int) -> int:
        return min(length, 12 + layer)

    ragged_manager = HeadKeepManager(per_head=True, counts=even, seed=seed)
    rect_manager = HeadKeepManager(per_head=False, counts=even, seed=seed)
    ragged, _, ragged_logits = _run(model, ragged_manager, prompt, steps=17)
    rect, _, rect_logits = _run(model, rect_manager, prompt, steps=17)
    ragged.close()
    rect.close()
    assert torch.allclose(ragged_logits, rect_logits, rtol=1e-4, atol=1e-5)
    assert len(ragged_manager.received) == len(rect_manager.received) >= 5
    for report, (got, want) in enumerate(zip(ragged_manager.received, rect_manager.received)):
        for key in want:
            for index, (g, w) in enumerate(zip(got[key], want[key])):
                assert g.shape == w.shape, (report, key, index)
                np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-6, err_msg=f"report {report} {key} stat {index}")


def test_the_per_head_cache_frees_what_it_evicts():
    model = _model()
    prompt = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(5))
    manager = HeadKeepManager(per_head=True, counts=_uneven, statistics=STATISTICS[:1])
    session, _, _ = _run(model, manager, prompt, steps=8, block_size=16)
    try:
        cache = session.cache
        counts = session.cache_counts()
        kept = sum(sum(cache.head_lengths(layer)) for layer in range(3))
        per_entry = 2 * 16 * 4  # keys + values, head_dim 16, float32
        assert counts["kept_kv_bytes"] == kept * per_entry
        assert kept * per_entry <= counts["kv_bytes"] <= 1.35 * kept * per_entry  # packed slack, tiny heads
        assert counts["final_head_lengths"] == [n for layer in range(3) for n in cache.head_lengths(layer)]
        assert counts["full_cache_bytes"] == (64 + 8) * 2 * 3 * per_entry
    finally:
        session.close()


def _generate(model, prompt: torch.Tensor, policy: str, budget: pb.BudgetSpec, steps: int = 12):
    import kvevict
    from kvevict.worker.generator import EvictingGenerator

    settings = EvictionSettings(policy=kvevict.policy(policy).spec(), budget=budget, block_size=8)
    return EvictingGenerator(model, EmbeddedManagerClient(), settings).generate(prompt, max_new_tokens=steps)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "caote+snapkv"])
def test_adahead_with_a_floor_of_the_whole_budget_is_the_uniform_allocator(policy):
    """floor = 1: every head keeps exactly the budget, its own best tokens, as uniform does; the
    per-head path (its cache, attention, statistics, the manager's per-head decision) must then
    generate uniform's tokens and keep the same counts."""
    model = _model()
    prompt = torch.randint(3, 97, (45,), generator=torch.Generator().manual_seed(11))
    uniform = _generate(model, prompt, policy, pb.BudgetSpec(tokens=12))
    per_head = _generate(model, prompt, policy, pb.BudgetSpec(tokens=12, allocator="adahead", floor=1.0))
    assert per_head.token_ids == uniform.token_ids
    assert per_head.summary.final_head_lengths == [uniform.summary.final_lengths[0]] * 6
    assert per_head.summary.final_lengths == uniform.summary.final_lengths


def test_adahead_moves_budget_between_heads_and_frees_it():
    model = _model()
    prompt = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(12))
    result = _generate(model, prompt, "snapkv", pb.BudgetSpec(tokens=16, allocator="adahead"), steps=4)
    heads = result.summary.final_head_lengths
    assert len(heads) == 6 and len(set(heads)) > 1, heads  # the budgets really differ per head
    for layer in range(3):  # each layer keeps its total: 2 heads x 16, plus the tokens since the last report
        assert sum(heads[2 * layer: 2 * layer + 2]) == sum(heads[0:2])
    assert min(heads) >= round(0.2 * 16)
    assert result.summary.kept_kv_bytes == sum(heads) * 2 * 16 * 4
    assert result.summary.kv_bytes <= 1.35 * result.summary.kept_kv_bytes


def test_a_per_head_session_falls_back_in_process_with_its_heads_as_they_are():
    """Fail-open: the manager is lost mid-generation; the in-process manager adopts each head's
    own positions and the generation goes on (the per-head adoption path)."""
    import kvevict
    from kvevict.worker.generator import EvictingGenerator
    from kvevict.worker.remote_manager import ManagerUnavailable

    class LosesTheSession(EmbeddedManagerClient):
        reports = 0

        def report_block(self, request):
            self.reports += 1
            if self.reports == 6:
                raise ManagerUnavailable("manager restarting")
            return super().report_block(request)

    model = _model()
    prompt = torch.randint(3, 97, (64,), generator=torch.Generator().manual_seed(13))
    settings = EvictionSettings(policy=kvevict.policy("snapkv").spec(),
                                budget=pb.BudgetSpec(tokens=16, allocator="adahead"), block_size=8)
    result = EvictingGenerator(model, LosesTheSession(), settings).generate(prompt, max_new_tokens=10)
    assert result.summary.manager_fallback
    assert len(result.token_ids) == 10
    assert sum(result.summary.final_head_lengths) <= 3 * 2 * 16 + 6 * 8


@pytest.mark.parametrize("policy", ["laprox", "querycaote"])
def test_observer_queries_score_a_per_head_session_as_they_score_a_uniform_one(policy):
    """Question-aware (the question's queries observe every report) in a per-head session, the
    window policies' per-query errors included: laprox's output projection is sized from the
    cache, since with observers no block's values reach the statistics. With a floor of the whole
    budget every head keeps what uniform keeps, so the logits after the context are uniform's."""
    model = _model()
    ids = torch.randint(3, 97, (52,), generator=torch.Generator().manual_seed(13))
    context, question = ids[:46], ids[46:]

    def prefill(budget: pb.BudgetSpec) -> tuple[torch.Tensor, list[int]]:
        settings = EvictionSettings(policy=pb.PolicySpec(base=policy, window=4), budget=budget, block_size=8,
                                    statistics_dtype=tensor_pb2.DTYPE_FLOAT32)
        session = CacheSession(model, EmbeddedManagerClient(), settings)
        try:
            session.observe_queries_of(question, first_position=len(context))
            logits = session.prefill(context)
            return logits, session.cache_counts()["final_lengths"]
        finally:
            session.close()

    uniform, uniform_lengths = prefill(pb.BudgetSpec(tokens=12))
    per_head, per_head_lengths = prefill(pb.BudgetSpec(tokens=12, allocator="adahead", floor=1.0))
    assert max(uniform_lengths) < len(context)  # it evicted
    assert per_head_lengths == uniform_lengths
    assert torch.allclose(per_head, uniform, rtol=1e-4, atol=1e-5)
