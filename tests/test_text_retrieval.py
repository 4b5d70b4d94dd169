"""The retrieval task rendered as text for any tokenizer: exact context length, facts after line
ends, needles that are exactly the answers' tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kvevict.evaluation.text_retrieval import TextRetrievalTask

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def task():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "demo-py")
    text = (ROOT / "examples" / "demo_prompt.py").read_text() * 3
    return TextRetrievalTask(tokenizer, text, fact_density=1 / 32)


@pytest.mark.parametrize("context, questions", [(256, 2), (512, 4)])
def test_layout_needles_and_answers(task, context: int, questions: int) -> None:
    tokenizer = task.tokenizer
    example = task.example(np.random.default_rng(context), context, questions)
    ids = example.token_ids
    assert example.context_tokens == context and ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(ids[:context].tolist())
    facts = [line.strip() for line in text.splitlines() if line.strip().startswith("key ")]
    assert len(facts) == example.fact_positions.size == round(context / 32)
    keys = [line.split()[1] for line in facts]
    assert len(set(keys)) == len(keys)
    for question in example.questions:
        needle = list(question.needle_positions)
        assert tuple(ids[needle]) == question.answer_ids == tuple(ids[question.answer_start:][:len(needle)])
        value = tokenizer.decode(list(question.answer_ids))
        asked = tokenizer.decode(ids[question.answer_start - 8: question.answer_start].tolist()).split("\n")[-1]
        assert f"{asked}{value}" in facts, (asked, value)
        assert max(needle) < context <= question.answer_start


def test_a_context_too_small_for_the_facts_is_rejected(task) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        task.example(np.random.default_rng(0), 40, 4)


def test_an_explicit_fact_count_sets_the_distractors(task) -> None:
    example = task.example(np.random.default_rng(3), 512, 2, facts=24)
    assert example.fact_positions.size == 24 and len(example.questions) == 2
    with pytest.raises(ValueError, match="cannot ask 4 questions of 3 facts"):
        task.example(np.random.default_rng(0), 512, 4, facts=3)
