"""The suite's runner: with the full cache it answers what plain transformers' greedy generate
answers; each protocol evicts as it says (one report for one-shot, the question never evicted);
question-aware changes what window policies keep and nothing else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvevict import wire
from kvevict.evaluation.runner import FULL_CACHE, FULL_CACHE_BUDGET, EvictionConfig
from kvevict.evaluation.suite_metric import cut_prediction
from kvevict.evaluation.suite_runner import answer_prompt, encode
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import CacheSession
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import load_model
from tests.checkpoints import save_tiny_checkpoint

CONTEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n" * 6
RECORDS = [dict(context=CONTEXT, question=question, max_new_tokens=12, answers=["x"], metric="all")
           for question in ("        self.x = ", "class Point:\n    def", "def add(")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), num_hidden_layers=2, hidden_size=64)


class RecordingManager(EmbeddedManagerClient):
    """The embedded manager, keeping every answer's keep masks."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[dict[int, np.ndarray]] = []

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        response = super().report_block(request)
        self.masks.append({k.layer: wire.decode_bits(k.keep, "keep") for k in response.keeps})
        return response


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_cache_answers_what_transformers_greedy_generate_answers(checkpoint, dtype: str) -> None:
    # The full cache is one forward of the whole prompt, as transformers runs it (on SmolLM2,
    # bfloat16 128-token blocks parted greedy paths from it on 5 of 18 prompts).
    model, tokenizer = load_model(str(checkpoint), dtype=dtype)
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    for record in RECORDS:
        got = answer_prompt(model, tokenizer, record, None, block_size=16)
        context, question = encode(tokenizer, record)
        ids = torch.tensor([context + question])
        with torch.inference_mode():
            expected = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        assert got.prediction == cut_prediction(tokenizer.decode(expected, skip_special_tokens=True))
        assert got.kept_tokens == got.context_tokens == len(context)


@pytest.mark.parametrize("protocol,reports", [("one_shot", 1), ("question_agnostic", None),
                                             ("question_in_context", None)])
def test_protocols_evict_the_context_only(checkpoint, protocol: str, reports: int | None) -> None:
    model, tokenizer = load_model(str(checkpoint))
    manager = RecordingManager()
    got = answer_prompt(model, tokenizer, RECORDS[0], EvictionConfig(base="tova"), 0.25, protocol, block_size=16,
                        manager=manager)
    assert got.kept_tokens == round(0.25 * got.context_tokens)
    # Block-wise: a report per block once over budget; one-shot: the whole context once. None after.
    expected = reports or -(-got.context_tokens // 16) - (got.kept_tokens // 16)
    assert len(manager.masks) == expected
    assert all(mask.shape[1] <= got.context_tokens for masks in manager.masks for mask in masks.values())


def test_question_aware_changes_what_window_policies_keep_and_only_theirs(checkpoint) -> None:
    model, tokenizer = load_model(str(checkpoint))

    def masks(base: str, protocol: str) -> list[dict[int, np.ndarray]]:
        manager = RecordingManager()
        answer_prompt(model, tokenizer, RECORDS[1], EvictionConfig(base=base), 0.25, protocol, block_size=16,
                      manager=manager)
        return manager.masks

    def same(a, b) -> bool:
        return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    assert not same(masks("snapkv", "question_agnostic"), masks("snapkv", "question_aware"))
    assert same(masks("keydiff", "question_agnostic"), masks("keydiff", "question_aware"))
    # The question forwarded on the cache: other queries than the context-free observers'.
    in_context = masks("snapkv", "question_in_context")
    assert not same(in_context, masks("snapkv", "question_aware"))
    assert not same(in_context, masks("snapkv", "question_agnostic"))
    assert same(masks("keydiff", "question_agnostic"), masks("keydiff", "question_in_context"))


def test_an_unknown_protocol_is_refused(checkpoint) -> None:
    model, tokenizer = load_model(str(checkpoint))
    with pytest.raises(ValueError, match="protocol"):
        answer_prompt(model, tokenizer, RECORDS[0], EvictionConfig(base="tova"), 0.5, "question_first")


def test_the_suite_benchmark_runs_resumes_and_tables_both_systems(checkpoint, tmp_path) -> None:
    from kvevict.evaluation.ruler import make_record
    from kvevict.evaluation.ruler_records import write_prompts
    from kvevict.evaluation.suite_report import FULL_CACHE, SuiteRow, append_rows, read_rows
    from tests.script_loader import load_script

    suite = load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = tmp_path / "suite.jsonl"
    write_prompts([make_record("niah_single_number_noise", tokenizer, 2048, i) for i in range(2)], prompts)
    out = tmp_path / "results.csv"
    argv = ["run", "--model", str(checkpoint), "--prompts", str(prompts), "--out", str(out), "--methods", "tova",
            "caote+tova", "--kept", "0.2", "0.5", "--block-size", "256", "--dtype", "float32", "--no-progress"]
    assert suite.main(argv) == 0
    rows = read_rows(out)
    # The full cache once per prompt, then 2 methods x 2 kept fractions x 2 prompts.
    assert len(rows) == 2 + 2 * 2 * 2
    assert sum(r.method == FULL_CACHE for r in rows) == 2
    assert all(0.0 <= r.score <= 1.0 and r.seconds > 0 for r in rows)
    assert suite.main(argv) == 0 and len(read_rows(out)) == len(rows)  # resumed: nothing measured again
    apart = tmp_path / "apart.csv"  # another process, same prompts: no second full cache
    assert suite.main(argv[:6] + [str(apart), "--methods", "keydiff", "--kept", "0.2", "--skip-full-cache",
                                  "--dtype", "float32", "--no-progress"]) == 0
    assert [r.method for r in read_rows(apart)] == ["keydiff"] * 2
    sunk = tmp_path / "sink.csv"  # the first 4 tokens protected: rows of their own name
    assert suite.main(argv[:6] + [str(sunk), "--methods", "keydiff", "--kept", "0.2", "--skip-full-cache", "--sink",
                                  "4", "--dtype", "float32", "--no-progress"]) == 0
    assert [r.method for r in read_rows(sunk)] == ["keydiff (sink 4)"] * 2
    # A peer's rows (as benchmarks/peers/kvpress/run.py writes them) join the table.
    peer = tmp_path / "kvpress.csv"
    full = [r for r in rows if r.method == FULL_CACHE]
    append_rows([SuiteRow("kvpress", "none", "question_agnostic", 1.0, r.id, r.task, r.length, r.score, "x", 0.5)
                 for r in full], peer)
    append_rows([SuiteRow("kvpress", "none", "question_aware", 1.0, r.id, r.task, r.length, 0.0, "x", 0.5)
                 for r in full], peer)  # kvpress writes its full cache once per protocol
    append_rows([SuiteRow("kvpress", "TOVAPress", "question_agnostic", 0.2, r.id, r.task, r.length, 1.0, "x", 0.5)
                 for r in full], peer)
    table = tmp_path / "suite.md"
    assert suite.main(["table", str(out), str(peer), "--out", str(table), "--min-full-cache", "0"]) == 0
    text = table.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| kv")]
    assert lines[0].startswith("| kvevict | full cache |") and lines[1].startswith("| kvpress | none |")
    peer_full = 100 * sum(r.score for r in full) / len(full)
    assert lines[1].split(" | ")[2].startswith(f"{peer_full:.1f} ± ") and "(n=2)" in lines[1]  # its agnostic rows only
    assert any(line.startswith("| kvpress | TOVAPress | 100.0 ± 0.0 (n=2) |") for line in lines)
    # The wrapper's effect, paired by prompt, from the same rows.
    by = {(r.method, r.kept_fraction, r.id): r.score for r in rows}
    diff = sum(by[("caote+tova", 0.2, i)] - by[("tova", 0.2, i)] for i in {r.id for r in rows}) / 2
    assert f"| caote+tova - tova | {100 * diff:+.1f} ± " in text
    assert suite.main(["run", "--model", str(checkpoint), "--prompts", str(prompts), "--out", str(out),
                       "--methods", "tova+caote"]) == 2


def test_a_cache_that_evicts_nothing_gives_transformers_logits_bit_for_bit_in_bfloat16(checkpoint) -> None:
    model, tokenizer = load_model(str(checkpoint), dtype="bfloat16")
    plain = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    context, question = encode(tokenizer, RECORDS[0])
    ids = context + question
    session = CacheSession(model, EmbeddedManagerClient(), FULL_CACHE.settings(FULL_CACHE_BUDGET, len(ids)))
    try:
        got = [session.prefill(torch.tensor(ids))]
        with torch.inference_mode():
            out = plain(torch.tensor([ids]), use_cache=True)
            expected, cache = [out.logits[0, -1]], out.past_key_values
            for _ in range(4):
                token = int(torch.argmax(expected[-1]))
                got.append(session.decode(token))
                out = plain(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                expected.append(out.logits[0, -1])
    finally:
        session.close()
    for step, (mine, theirs) in enumerate(zip(got, expected)):
        assert torch.equal(mine, theirs), f"step {step}: max difference {(mine - theirs).abs().max()}"


def test_the_full_cache_is_one_forward_of_the_whole_prompt(checkpoint, monkeypatch) -> None:
    model, tokenizer = load_model(str(checkpoint))
    blocks: list[int] = []
    forward = CacheSession._forward

    def spy(self, chunk, *args, **kwargs):
        blocks.append(chunk.numel())
        return forward(self, chunk, *args, **kwargs)

    monkeypatch.setattr(CacheSession, "_forward", spy)
    answer_prompt(model, tokenizer, RECORDS[0], None, block_size=16)
    context, question = encode(tokenizer, RECORDS[0])
    assert blocks[0] == len(context) + len(question) and set(blocks[1:]) <= {1}
