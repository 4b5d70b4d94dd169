"""Context reconstruction (KVzip's queries): before a prefill decision the session forwards KVzip's
repeat prompt and the context fed so far on its cache, observes with the repeated tokens' queries,
and leaves the cache exactly as it was; the speculative keys are no candidates but keep their share
of each query's attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import kvevict
from kvevict import wire
from kvevict.evaluation.suite_grid import RECONSTRUCT_CHUNK, method_config, method_name
from kvevict.evaluation.suite_jobs import configured_jobs
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.observers import REPEAT_FIRST, REPEAT_OVERLAP, REPEAT_PART, RepeatPrompt
from tests.checkpoints import save_tiny_checkpoint
from tests.tiny_models import tiny_config

# Stand-ins for the tokenizer's ids of KVzip's prompts (the tiny models have no tokenizer).
PROMPT = RepeatPrompt(first=(5, 6, 7), part=(8, 9), suffix=(10,))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def _settings(budget: int, block: int, pool: str = "max", chunk: int = RECONSTRUCT_CHUNK,
              policy: str = "tova") -> EvictionSettings:
    return EvictionSettings(policy=kvevict.policy(policy).spec(), budget=pb.BudgetSpec(tokens=budget),
                            block_size=block, reconstruct=chunk, reconstruct_pool=pool, repeat_prompt=PROMPT,
                            statistics_dtype=tensor_pb2.DTYPE_FLOAT32)


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(11, 97, (n,), generator=torch.Generator().manual_seed(seed))


def _state(session: CacheSession) -> tuple:
    cache = session.cache
    return ([(e.keys, e.values) for e in cache.hf_cache.layers], list(cache._positions), cache.tokens_seen)


def test_the_speculative_forward_leaves_the_cache_exactly_as_it_was(monkeypatch):
    model = _model()
    calls = []
    original = CacheSession._reconstruction_queries

    def spied(self):
        before = _state(self)
        copies = [(k.clone(), v.clone()) for k, v in before[0]], [p.clone() for p in before[1]]
        queries = original(self)
        after = _state(self)
        calls.append(dict(
            same_tensors=all(a is b for pair in zip(before[0], after[0]) for a, b in zip(*pair)),
            same_values=all(torch.equal(k, ck) and torch.equal(v, cv)
                            for (k, v), (ck, cv) in zip(after[0], copies[0])),
            same_positions=all(torch.equal(p, c) for p, c in zip(after[1], copies[1])),
            tokens_seen=(before[2], after[2]), fed=self.tokens_fed,
            observers=queries.layers[0].queries.shape[2]))
        return queries

    monkeypatch.setattr(CacheSession, "_reconstruction_queries", spied)
    session = CacheSession(model, EmbeddedManagerClient(), _settings(budget=20, block=16))
    try:
        logits = session.prefill(_prompt(64, 1))
        session.decode(int(torch.argmax(logits)))
        assert session.cache.tokens_seen == 65
    finally:
        session.close()
    assert len(calls) == 3  # one per report: every prefill block but the first (16 <= 20), none while decoding
    for number, call in enumerate(calls, start=2):
        assert call["same_tensors"] and call["same_values"] and call["same_positions"]
        assert call["tokens_seen"][0] == call["tokens_seen"][1] == call["fed"] == 16 * number
        assert call["observers"] == 16 * number  # every repeated context token observes, not the prompt


def test_the_observer_queries_are_a_brute_force_forward_of_the_same_tokens_on_a_copy_of_the_cache():
    model = _model()
    prompt = _prompt(56, 2)
    session = CacheSession(model, EmbeddedManagerClient(), _settings(budget=24, block=16))
    try:
        session.prefill(prompt)
        lengths = [session.cache.length(layer) for layer in range(session.cache.num_layers)]
        assert max(lengths) < 56  # evicted: the copy is a pruned cache
        keys_values = [(e.keys.clone(), e.values.clone()) for e in session.cache.hf_cache.layers]
        positions = [session.cache.positions(layer).clone() for layer in range(session.cache.num_layers)]
        observers = session._reconstruction_queries()
        fed = session.tokens_fed
    finally:
        session.close()
    # The same tokens on a copy, through transformers' eager attention, which returns every weight.
    tokens = [*PROMPT.first, *PROMPT.suffix, *prompt.tolist()]
    copy = DynamicCache()
    for layer, (keys, values) in enumerate(keys_values):
        copy.update(keys, values, layer)
    model.set_attn_implementation("eager")
    length = lengths[0]
    with torch.no_grad():
        output = model(input_ids=torch.tensor([tokens]), position_ids=torch.arange(fed, fed + len(tokens))[None],
                       cache_position=torch.arange(length, length + len(tokens)), past_key_values=copy,
                       use_cache=True, output_attentions=True)
    lead = len(PROMPT.first) + len(PROMPT.suffix)
    heads, group = 2, 2
    for layer, weights in enumerate(output.attentions):  # (1, Hq, T, L + T)
        keys = keys_values[layer][0][0].float()
        probs, _ = observers.probabilities(layer, keys, positions[layer], window=1)
        # The repeated tokens' share of attention on the cached entries only, not renormalized:
        # the speculative keys keep theirs.
        expected = weights[0, :, lead:, :length].reshape(heads, group, len(tokens) - lead, length)
        torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
        assert (probs.sum(-1) < 1 - 1e-3).any()
        torch.testing.assert_close(observers.attention(layer, keys, positions[layer], window=1),
                                   expected.amax(dim=(1, 2)), atol=1e-5, rtol=1e-4)


def test_a_later_chunk_repeats_after_kvzips_part_prompt_and_the_tokens_before_it(monkeypatch):
    model = _model()
    prompt = _prompt(48, 3)
    fed = []
    real_forward = model.forward

    def recording(*args, **kwargs):
        if kwargs.get("past_key_values") is not None and kwargs["input_ids"].shape[1] > 16:
            fed.append(kwargs["input_ids"][0].tolist())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    session = CacheSession(model, EmbeddedManagerClient(), _settings(budget=8, block=16, chunk=20))
    try:
        session.prefill(prompt)
    finally:
        session.close()
    ids = prompt.tolist()
    assert fed[0] == [*PROMPT.first, *PROMPT.suffix, *ids[:16]]
    assert fed[1] == [*PROMPT.part, *ids[12 - REPEAT_OVERLAP:12], *PROMPT.suffix, *ids[12:32]]
    assert fed[2] == [*PROMPT.part, *ids[28 - REPEAT_OVERLAP:28], *PROMPT.suffix, *ids[28:48]]


def test_a_budget_above_the_sequence_gives_the_plain_generation(monkeypatch):
    model = _model()
    prompt = _prompt(40, 4)
    calls = []
    original = CacheSession._reconstruction_queries
    monkeypatch.setattr(CacheSession, "_reconstruction_queries", lambda self: calls.append(1) or original(self))
    # h2o reports every block whatever the budget (it accumulates), so the reconstructions do run.
    session = CacheSession(model, EmbeddedManagerClient(), _settings(budget=500, block=16, policy="h2o"))
    generated = []
    try:
        logits = session.prefill(prompt)
        for _ in range(6):
            generated.append(int(torch.argmax(logits)))
            logits = session.decode(generated[-1])
    finally:
        session.close()
    assert calls, "no reconstruction ran"
    plain = model.generate(prompt[None], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generated == plain[0, 40:].tolist()


class StatisticsRecorder(EmbeddedManagerClient):
    """The embedded manager, keeping every report's statistics per layer (float32 on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.statistics: list[dict[int, np.ndarray]] = []

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        self.statistics.append({s.layer: wire.decode(s.values[0], "values") for s in request.layers})
        return super().report_block(request)


@pytest.mark.parametrize("pool", ["max", "sum"])
def test_the_decision_scores_with_the_reconstruction_queries(monkeypatch, pool):
    model = _model()
    prompt = _prompt(48, 5)
    seen = []
    original = CacheSession._reconstruction_queries

    def spied(self):
        queries = original(self)
        cache = [(self.cache.keys_values(layer)[0][0].float(), self.cache.positions(layer).clone())
                 for layer in range(self.cache.num_layers)]
        seen.append({layer: queries.attention(layer, keys, positions, 1).numpy()
                     for layer, (keys, positions) in enumerate(cache)})
        return queries

    monkeypatch.setattr(CacheSession, "_reconstruction_queries", spied)
    runs = {}
    for reconstruct in (RECONSTRUCT_CHUNK, 0):
        manager = StatisticsRecorder()
        settings = _settings(budget=12, block=16, pool=pool)
        settings.reconstruct = reconstruct
        session = CacheSession(model, manager, settings)
        try:
            session.prefill(prompt)
        finally:
            session.close()
        runs[reconstruct] = manager.statistics
    assert len(seen) == len(runs[RECONSTRUCT_CHUNK]) == 3
    for expected, sent in zip(seen, runs[RECONSTRUCT_CHUNK]):
        for layer, values in sent.items():
            np.testing.assert_allclose(values, expected[layer], rtol=1e-6, atol=1e-7)
    # Without reconstruction TOVA's statistic is the last query's attention: another one.
    assert any(not np.allclose(a[layer], b[layer]) for a, b in zip(runs[RECONSTRUCT_CHUNK], runs[0]) for layer in a)


def test_question_aware_observers_are_joined_to_the_reconstructions(monkeypatch):
    model = _model()
    prompt, question = _prompt(32, 6), _prompt(5, 7)
    seen = []
    original = CacheSession._reconstruction_queries

    def spied(self):
        queries = original(self)
        seen.append([(queries, self.collector.observers, self.cache.keys_values(layer)[0][0].float(),
                      self.cache.positions(layer).clone()) for layer in range(self.cache.num_layers)])
        return queries

    monkeypatch.setattr(CacheSession, "_reconstruction_queries", spied)
    manager = StatisticsRecorder()
    session = CacheSession(model, manager, _settings(budget=12, block=16))
    try:
        session.observe_queries_of(question, first_position=32)
        standing = session.collector.observers
        session.prefill(prompt)
        assert session.collector.observers is standing  # the question's observers stay for later reports
    finally:
        session.close()
    assert len(seen) == len(manager.statistics) == 2
    for layers, sent in zip(seen, manager.statistics):
        for layer, (reconstruction, question_queries, keys, positions) in enumerate(layers):
            assert question_queries is standing
            # TOVA's statistic: the reconstruction's maximum plus the question's last query.
            expected = (reconstruction.attention(layer, keys, positions, 1)
                        + standing.attention(layer, keys, positions, 1))
            np.testing.assert_allclose(sent[layer], expected.numpy(), rtol=1e-6, atol=1e-7)
            assert not np.allclose(sent[layer], reconstruction.attention(layer, keys, positions, 1).numpy())


def test_settings_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="repeat_prompt"):
        CacheSession(model, EmbeddedManagerClient(), EvictionSettings(reconstruct=16))
    with pytest.raises(ValueError, match="reconstruct_pool"):
        CacheSession(model, EmbeddedManagerClient(), EvictionSettings(reconstruct=16, reconstruct_pool="mean",
                                                                       repeat_prompt=PROMPT))
    with pytest.raises(ValueError, match="reconstruct"):
        CacheSession(model, EmbeddedManagerClient(), EvictionSettings(reconstruct=-1))


def test_the_repeat_prompt_is_kvzips_wording(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_checkpoint(tmp_path / "raw"))
    prompt = RepeatPrompt.from_tokenizer(tokenizer)
    assert tokenizer.decode(prompt.first) == "\n\nRepeat the previous context exactly."
    assert tokenizer.decode(prompt.part) == "\n\nRepeat the part of the previous context exactly, starting with"
    assert tokenizer.decode(prompt.suffix) == "\n" and (REPEAT_FIRST, REPEAT_PART) == (
        tokenizer.decode(prompt.first), tokenizer.decode(prompt.part))
    chat = AutoTokenizer.from_pretrained(save_tiny_checkpoint(tmp_path / "chat", chat_template=True))
    rendered = chat.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                        tokenize=False)
    suffix = chat.decode(RepeatPrompt.from_tokenizer(chat, chat_template=True).suffix)
    assert suffix != "\n" and rendered.endswith(suffix)


def test_suite_rows_are_named_by_the_reconstruction(tmp_path):
    from pathlib import Path

    from kvevict.evaluation.ruler import make_record
    from kvevict.evaluation.ruler_records import write_prompts
    from kvevict.evaluation.suite_report import read_rows
    from tests.script_loader import load_script

    assert method_name("snapkv", "uniform", reconstruct=RECONSTRUCT_CHUNK) == "snapkv (reconstruct)"
    assert method_name("caote+snapkv", "uniform", reconstruct=512) == "caote+snapkv (reconstruct 512)"
    assert method_name("tova", "uniform", reconstruct=RECONSTRUCT_CHUNK, reconstruct_pool="sum") == \
        "tova (reconstruct sum)"
    assert method_name("tova", "uniform") == "tova"
    assert method_config("querycaote", reconstruct=64).reconstruct == 64
    [job] = configured_jobs(["tova"], ["uniform"], ["question_aware"], [0.2], full_cache=False,
                            reconstruct=RECONSTRUCT_CHUNK)
    assert (job.method, job.config.reconstruct, job.config.reconstruct_pool) == ("tova (reconstruct)", 2048, "max")

    import argparse

    from kvevict.evaluation.eval_command import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    parsed = parser.parse_args(["eval", "--model", "m", "--data", "d.jsonl", "--reconstruct"])
    assert parsed.reconstruct == RECONSTRUCT_CHUNK  # eval's const is the suite's chunk

    suite = load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py")
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", num_hidden_layers=2, hidden_size=64)
    prompts = tmp_path / "suite.jsonl"
    write_prompts([make_record("niah_single_number_noise", AutoTokenizer.from_pretrained(checkpoint), 2048, 0)],
                  prompts)
    out = tmp_path / "results.csv"
    argv = ["run", "--model", str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--methods", "tova",
            "--kept", "0.2", "--skip-full-cache", "--block-size", "512", "--dtype", "float32", "--no-progress"]
    assert suite.main(argv + ["--reconstruct"]) == 0
    assert suite.main(argv + ["--reconstruct", "256", "--reconstruct-pool", "sum"]) == 0
    assert suite.main(argv) == 0
    assert [r.method for r in read_rows(out)] == ["tova (reconstruct)", "tova (reconstruct 256 sum)", "tova"]
    with pytest.raises(SystemExit):
        suite.main(argv + ["--reconstruct", "-3"])
