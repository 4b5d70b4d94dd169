"""Sliding-window layers: attention honours the window by absolute position; the tokens no later
query can see are dropped first and free (by the worker from its cache and by the manager from its
state, column for column), budgets go to what queries can still see, and the full-cache bytes are
those transformers' own cache holds."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvevict.cache_manager.sliding import hidden
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.kv_cache import PrunableCache
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import geometry_of, model_from_config
from kvevict.worker.remote_manager import ManagerUnavailable
from tests.tiny_models import WINDOW, tiny_config
from tests.worker_doubles import VisibilityTrace, masked_full_forward

PROMPT_TOKENS, BLOCK, NEW_TOKENS = 43, 8, 21
# Mixed sliding and full layers (Gemma 3's pattern, Gemma 2's soft-capping) and all-sliding (Mistral).
WINDOWED = {"gemma3": ("gemma3", {}), "gemma2": ("gemma2", {}), "mistral": ("mistral", dict(sliding_window=WINDOW))}


def _windowed(name: str, seed: int = 6):
    arch, overrides = WINDOWED[name]
    config = tiny_config(arch, **overrides)
    return config, model_from_config(config, seed=seed)


def _prompt(vocab_size: int, length: int = PROMPT_TOKENS) -> torch.Tensor:
    return torch.randint(3, vocab_size, (length,), generator=torch.Generator().manual_seed(8))


def _settings(base: str, wrapper: str = "none", budget: int = 8, allocator: str = "", sink: int = 2,
              recent: int = 2) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=sink, recent_tokens=recent),
                            budget=pb.BudgetSpec(tokens=budget, allocator=allocator), block_size=BLOCK,
                            statistics_dtype=tensor_pb2.DTYPE_FLOAT32)


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


class _UnseenWatch:
    """Checks every period end and every keep mask of the sliding layers of one generation."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kept = self.kept_unseen = self.keeps = 0
        end_period, apply_keep = CacheSession._end_period, PrunableCache.apply_keep

        def checked_end_period(session: CacheSession, phase: int) -> None:
            end_period(session, phase)
            for layer in range(session.cache.num_layers):
                self.no_column_unseen_by_every_head(session.cache, layer)

        def checked_keep(cache: PrunableCache, layer: int, keep: torch.Tensor) -> None:
            self.no_visible_token_evicted_for_an_unseen_one(cache, layer, keep)
            apply_keep(cache, layer, keep)

        monkeypatch.setattr(CacheSession, "_end_period", checked_end_period)
        monkeypatch.setattr(PrunableCache, "apply_keep", checked_keep)

    @staticmethod
    def _unseen(cache: PrunableCache, layer: int) -> torch.Tensor | None:
        positions = cache.positions(layer)
        # The newest token sits in every head: the highest position is the last one fed.
        return hidden(positions, int(positions.max()), cache.window(layer)) if cache.window(layer) else None

    def no_column_unseen_by_every_head(self, cache: PrunableCache, layer: int) -> None:
        unseen = self._unseen(cache, layer)
        if unseen is not None:
            assert not unseen.all(dim=0).any(), f"layer {layer} keeps a column no head can see"

    def no_visible_token_evicted_for_an_unseen_one(self, cache: PrunableCache, layer: int, keep: torch.Tensor) -> None:
        unseen = self._unseen(cache, layer)
        if unseen is None:
            return
        self.keeps += 1
        # An unseen token may stay only where its head keeps every token it can still see
        # (every head keeps as many tokens: a head with fewer visible ones pads with unseen ones).
        padded = (keep & unseen).any(dim=1)
        assert not (padded & (~keep & ~unseen).any(dim=1)).any(), \
            f"layer {layer}: a head evicted a visible token and kept one no query can see"
        self.kept += int(keep.sum())
        self.kept_unseen += int((keep & unseen).sum())


def _watched_run(name: str, settings: EvictionSettings, monkeypatch: pytest.MonkeyPatch) -> _UnseenWatch:
    config, model = _windowed(name)
    watch = _UnseenWatch(monkeypatch)
    EvictingGenerator(model, EmbeddedManagerClient(), settings).generate(_prompt(config.vocab_size), NEW_TOKENS)
    assert watch.keeps > 0  # sliding layers did evict (budget < window - 1)
    return watch


@pytest.mark.parametrize("name", ["gemma3", "mistral"])
@pytest.mark.parametrize("base,wrapper,budget,block,allocator", [
    ("streaming", "none", 8, 8, ""), ("h2o", "caote", 8, 8, ""), ("keydiff", "none", 10, 4, ""),
    ("tova", "fastcaote", 10, 4, ""), ("snapkv", "caote", 24, 4, "pyramid")])
def test_no_kept_token_is_out_of_every_querys_window(name, base, wrapper, budget, block, allocator, monkeypatch):
    settings = _settings(base, wrapper, budget, allocator)
    settings.block_size = block
    watch = _watched_run(name, settings, monkeypatch)
    # A head's kept tokens leave the window at most one per new token, and the new ones fill
    # in: with budgets that never grow, every head sees at least as many tokens as it keeps.
    assert watch.kept_unseen == 0, (watch.kept_unseen, watch.kept)


def test_under_growing_budgets_a_head_keeps_unseen_tokens_only_as_padding(monkeypatch):
    """adaptive may give a sliding layer more than one of its heads still sees: that head keeps
    all it sees and pads its row (the cache is rectangular) with what no query can see."""
    settings = _settings("tova", "caote", 8, "adaptive", sink=1, recent=1)
    settings.block_size = 4
    watch = _watched_run("mistral", settings, monkeypatch)  # checks the padding rule at every keep
    assert 0 < watch.kept_unseen  # guard: this run does pad


def test_sliding_layers_keep_everything_a_query_can_see_when_it_fits_their_budget():
    config, model = _windowed("gemma3")
    budget = WINDOW + 4  # above the window - 1 tokens a sliding layer can still show a query
    result = EvictingGenerator(model, EmbeddedManagerClient(), _settings("h2o", "caote", budget)).generate(
        _prompt(config.vocab_size), NEW_TOKENS)
    sliding = [layer for layer, kind in enumerate(config.layer_types) if kind == "sliding_attention"]
    evicted = result.summary.evicted_per_layer
    assert [evicted[layer] for layer in sliding] == [0] * len(sliding)
    assert evicted[config.layer_types.index("full_attention")] > 0
    assert max(result.summary.peak_lengths[layer] for layer in sliding) <= WINDOW - 1 + BLOCK


@pytest.mark.parametrize("name", list(WINDOWED))
@pytest.mark.parametrize("base,wrapper,allocator", [("h2o", "caote", ""), ("streaming", "none", ""),
                                                    ("snapkv", "fastcaote", "adaptive")])
def test_eviction_on_a_windowed_model_equals_a_masked_full_forward(name, base, wrapper, allocator):
    config, model = _windowed(name, seed=4)
    prompt = _prompt(config.vocab_size)
    trace = VisibilityTrace()
    result = EvictingGenerator(model, EmbeddedManagerClient(), _settings(base, wrapper, 8, allocator)).generate(
        prompt, NEW_TOKENS, observer=trace, keep_logits=True)
    assert sum(result.summary.evicted_per_layer) > 0
    sequence = prompt.tolist() + result.token_ids[:-1]
    reference = masked_full_forward(model, sequence, trace.masks(len(sequence)))
    assert (torch.stack(result.step_logits) - reference[PROMPT_TOKENS - 1:]).abs().max().item() < 1e-4


def _stock_cache_bytes(config, model, token_ids: list[int]) -> int:
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    stock.load_state_dict(model.state_dict())
    cache = DynamicCache(config=config)
    with torch.no_grad():
        stock.eval()(input_ids=torch.tensor([token_ids]), past_key_values=cache, use_cache=True)
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@pytest.mark.parametrize("name", list(WINDOWED))
def test_the_full_cache_and_the_cache_held_are_what_transformers_holds(name):
    config, model = _windowed(name)
    prompt = _prompt(config.vocab_size, 5 * BLOCK)  # prefill only, ending at a period's end
    result = EvictingGenerator(model, EmbeddedManagerClient(), _settings("h2o", budget=1000)).generate(prompt, 1)
    expected = _stock_cache_bytes(config, model, prompt.tolist())
    assert result.summary.full_cache_bytes == expected
    assert result.summary.kv_bytes == expected  # nothing evicted, the out-of-window tokens dropped
    assert result.summary.evicted_per_layer == [0] * config.num_hidden_layers
    geometry = geometry_of(config)
    unwindowed = 5 * BLOCK * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 2 * 4
    assert expected < unwindowed


@pytest.mark.parametrize("base,wrapper,allocator", [("h2o", "caote", ""), ("keydiff", "none", "pyramid"),
                                                    ("tova", "caote", "adaptive")])
def test_the_manager_state_stays_aligned_with_the_cache_column_for_column(base, wrapper, allocator):
    config, model = _windowed("gemma3")
    manager = EmbeddedManagerClient()
    budget = 24 if allocator == "pyramid" else 8  # pyramid's top layer keeps (B - 4) / 20 + 4 > sink + recent
    session = CacheSession(model, manager, _settings(base, wrapper, budget, allocator))
    checked = 0

    def check() -> None:
        nonlocal checked
        if session.stats.reports == checked:
            return  # no report since the last check: the manager has not seen the drops yet
        checked = session.stats.reports
        state = manager.core.store.get(session.session_id)
        for layer in range(config.num_hidden_layers):
            np.testing.assert_array_equal(state.positions[layer], session.cache.positions(layer).numpy())
            if state.accumulators:
                assert state.accumulators[layer].shape == state.positions[layer].shape
        # Every allocator keeps at most its total (adaptive: less when sliding layers hold less).
        assert sum(state.cache_lengths) <= sum(state.layer_budgets) <= config.num_hidden_layers * budget

    try:
        prompt = _prompt(config.vocab_size)
        for chunk in torch.split(prompt, BLOCK):
            session.prefill(chunk)
            check()
        for step in range(3 * BLOCK):
            session.decode(int(prompt[step]))
            check()
    finally:
        session.close()
    assert checked >= 4


class _LostAfter(EmbeddedManagerClient):
    """A manager that answers `reports` reports, then is unreachable."""

    def __init__(self, reports: int) -> None:
        super().__init__()
        self.left = reports

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        if self.left == 0:
            raise ManagerUnavailable("unreachable")
        self.left -= 1
        return super().report_block(request)


@pytest.mark.parametrize("lost_after", [3, 6])  # in the prefill, in the decode
def test_a_lost_manager_fails_open_to_the_same_decisions_on_a_windowed_model(lost_after):
    """The in-process manager adopts the cache as it was before the report (out-of-window
    tokens of skipped periods already dropped) and applies the same rule: TOVA, which keeps no
    state beyond the cache, decides exactly as the lost manager would have."""
    config, model = _windowed("gemma3")
    prompt = _prompt(config.vocab_size)
    expected = EvictingGenerator(model, EmbeddedManagerClient(), _settings("tova", "caote")).generate(prompt, NEW_TOKENS)
    result = EvictingGenerator(model, _LostAfter(lost_after), _settings("tova", "caote")).generate(prompt, NEW_TOKENS)
    assert result.summary.manager_fallback
    assert result.token_ids == expected.token_ids
    assert result.summary.final_lengths == expected.summary.final_lengths
    assert result.summary.evicted_per_layer == expected.summary.evicted_per_layer
