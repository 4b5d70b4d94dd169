"""The shipped retrieval checkpoint (models/retrieval) and its training script: the model answers
from its cache (full-cache accuracy through the worker's code path, chance once the needle is
gone), and the script trains a loadable checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvevict.evaluation.grid import RECENT_WINDOW
from kvevict.evaluation.retrieval_task import RetrievalTask, build_tokenizer
from kvevict.evaluation.runner import FULL_CACHE, FULL_CACHE_BUDGET, evaluate_retrieval

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "models" / "retrieval"
SCRIPT = ROOT / "scripts" / "train_retrieval_model.py"
# The model card's full-cache accuracy at 1024 tokens is measured on 512 questions; 48 fixed
# questions here must reach the 90% target.
MIN_FULL_CACHE_ACCURACY = 0.9


@pytest.fixture(scope="module")
def loaded():
    from kvevict.worker.model_loader import load_model

    model, tokenizer = load_model(str(CKPT))
    return model, tokenizer, RetrievalTask.load(CKPT)


@pytest.fixture(scope="module")
def examples(loaded):
    _, _, task = loaded
    rng = np.random.default_rng(2024)
    return [task.example(rng, 1024, 8) for _ in range(6)]


def test_checkpoint_files_fit_and_match_the_task(loaded) -> None:
    model, tokenizer, task = loaded
    size = sum(p.stat().st_size for p in CKPT.iterdir() if p.is_file())
    assert size < 5_000_000, size
    assert model.config.vocab_size == task.vocab_size == len(tokenizer)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    assert tokenizer.get_vocab() == build_tokenizer(task).get_vocab()
    summary = json.loads((CKPT / "training_summary.json").read_text())
    assert summary["smoke"] is False and summary["final_accuracy"]["1024"] >= MIN_FULL_CACHE_ACCURACY


def test_full_cache_accuracy_at_1024_tokens(loaded, examples) -> None:
    model, _, _ = loaded
    settings = FULL_CACHE.settings(FULL_CACHE_BUDGET, 64)
    outcomes = [evaluate_retrieval(model, settings, e) for e in examples]
    accuracy = sum(o.answered for o in outcomes) / sum(o.asked for o in outcomes)
    assert accuracy >= MIN_FULL_CACHE_ACCURACY, accuracy


def test_answers_come_from_the_cache(loaded, examples) -> None:
    # The recent window at 10% keeps only the last ~102 context tokens: questions whose fact was
    # evicted everywhere drop to about chance (1 in 16), those whose fact stayed are answered.
    model, _, _ = loaded
    settings = RECENT_WINDOW.settings(102, 64)
    kept, lost = [], []
    for example in examples:
        outcome = evaluate_retrieval(model, settings, example)
        for correct, fraction in zip(outcome.correct, outcome.kept):
            (kept if fraction == 1.0 else lost).append(correct)
            assert fraction in (0.0, 1.0)  # a recent window is the same in every layer and head
    assert len(lost) >= 30
    assert np.mean(lost) <= 0.25, np.mean(lost)
    assert not kept or np.mean(kept) >= 0.75


@pytest.mark.parametrize("options", [[], ["--shorter-share", "0.3", "--density-range", "0.5", "2"]],
                         ids=["shipped-recipe", "mixed-lengths"])
def test_smoke_training_writes_a_loadable_checkpoint(tmp_path, options) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *options], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    task = RetrievalTask.load(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == task.vocab_size == len(tokenizer)
    ids = torch.from_numpy(task.example(np.random.default_rng(0), 64, 2).token_ids)[None]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    log = (out / "training_log.csv").read_text().splitlines()
    assert log[0].startswith("step,") and len(log) >= 3
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["smoke"] is True
    assert summary["shorter_share"] == (0.3 if options else 0.0)
