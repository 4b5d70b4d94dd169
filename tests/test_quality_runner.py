"""The quality runner measures what it claims, through the worker's code path: with no eviction
its answers and log-likelihoods equal one plain forward of the model, and its record of which
needles survived equals what the recent-window policy must keep."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from kvevict.evaluation.grid import RECENT_WINDOW
from kvevict.evaluation.retrieval_task import RetrievalTask
from kvevict.evaluation.runner import FULL_CACHE, FULL_CACHE_BUDGET, evaluate_retrieval, evaluate_text
from kvevict.worker.model_loader import model_from_config

TASK = RetrievalTask(keys=64, values=8)
CONTEXT, BLOCK, QUESTIONS = 192, 32, 8


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return model_from_config(config, seed=3)


def _examples(count: int = 3):
    rng = np.random.default_rng(0)
    return [TASK.example(rng, CONTEXT, QUESTIONS) for _ in range(count)]


def test_full_cache_answers_are_the_argmax_of_one_plain_forward(model) -> None:
    settings = FULL_CACHE.settings(FULL_CACHE_BUDGET, BLOCK)
    for example in _examples():
        outcome = evaluate_retrieval(model, settings, example)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(example.token_ids)[None]).logits[0]
        expected = [int(logits[q.answer_start - 1].argmax()) == q.answer_ids[0] for q in example.questions]
        assert list(outcome.correct) == expected
        assert outcome.kept == (1.0,) * QUESTIONS


@pytest.mark.parametrize("budget", [16, 48, 100])
def test_needle_survival_matches_the_recent_window(model, budget: int) -> None:
    # Questions start at a block boundary, so they are read with exactly the `budget` most recent
    # context tokens cached in every layer and head.
    settings = RECENT_WINDOW.settings(budget, BLOCK)
    for example in _examples():
        outcome = evaluate_retrieval(model, settings, example)
        expected = [float(q.needle_positions[0] >= CONTEXT - budget) for q in example.questions]
        assert list(outcome.kept) == expected
        assert outcome.asked == QUESTIONS and 0 <= outcome.answered <= QUESTIONS


def test_text_full_cache_equals_the_plain_forward_loss(model) -> None:
    from kvevict.evaluation.retrieval_task import build_tokenizer

    tokenizer = build_tokenizer(TASK)
    window = torch.from_numpy(_examples(1)[0].token_ids[:150])
    outcome = evaluate_text(model, FULL_CACHE.settings(FULL_CACHE_BUDGET, BLOCK), window, tokenizer)
    with torch.no_grad():
        loss = model(input_ids=window[None], labels=window[None]).loss.item()
    assert outcome.tokens == 149
    assert outcome.nats == pytest.approx(loss * 149, rel=1e-4)
    assert outcome.bytes == len(tokenizer.decode(window[1:].tolist()).encode())
