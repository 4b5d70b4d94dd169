"""The synthetic retrieval task: layout of a prompt, facts and distractors, questions, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from kvevict.evaluation.retrieval_task import BOS_ID, RetrievalTask, build_tokenizer

TASK = RetrievalTask()


def _decode_fact(task: RetrievalTask, token: int) -> tuple[int, int]:
    offset = token - task.first_fact
    return offset // task.values, offset % task.values


@pytest.mark.parametrize("context, questions", [(128, 4), (1024, 8), (2048, 8)])
def test_prompt_layout_facts_and_questions(context: int, questions: int) -> None:
    example = TASK.example(np.random.default_rng(context), context, questions)
    ids = example.token_ids
    assert ids.size == context + 2 * questions and example.context_tokens == context
    assert ids[0] == BOS_ID and (ids[1:] != BOS_ID).all()
    body = ids[1:context]
    is_fact = (body >= TASK.first_fact) & (body < TASK.first_question)
    is_syllable = (body >= TASK.first_syllable) & (body < TASK.first_fact)
    assert (is_fact | is_syllable).all(), "the context holds only filler words and facts"
    np.testing.assert_array_equal(np.flatnonzero(is_fact) + 1, example.fact_positions)
    assert example.fact_positions.size == round(TASK.fact_density * context)
    keys = [_decode_fact(TASK, int(t))[0] for t in ids[example.fact_positions]]
    assert len(set(keys)) == len(keys), "keys are distinct within a prompt"
    tail = ids[context:]
    assert ((tail[0::2] >= TASK.first_question) & (tail[0::2] < TASK.first_value)).all()
    assert (tail[1::2] >= TASK.first_value).all()
    needles = set()
    for index, question in enumerate(example.questions):
        assert question.answer_start == context + 2 * index + 1
        (needle,) = question.needle_positions
        key, value = _decode_fact(TASK, int(ids[needle]))
        assert ids[question.answer_start - 1] == TASK.first_question + key
        assert question.answer_ids == (TASK.first_value + value,) == (ids[question.answer_start],)
        needles.add(needle)
    assert len(needles) == questions < example.fact_positions.size, "most facts are distractors"


def test_facts_sit_between_filler_words() -> None:
    task = RetrievalTask(words=8, max_word_syllables=4)
    words = {tuple(w) for w in task.lexicon}
    example = task.example(np.random.default_rng(3), 256, 4)
    body = example.token_ids[1:256]
    # Between two facts (and at either end) the filler must split into whole lexicon words.
    pieces = np.split(body, np.flatnonzero(body >= task.first_fact))
    assert len(pieces) > 4
    for index, piece in enumerate(pieces[:-1]):  # the last piece ends where the context was cut
        tokens = tuple(int(t) for t in piece if t < task.first_fact)
        reachable = {0}
        for end in range(1, len(tokens) + 1):
            if any(end - len(w) in reachable and tokens[end - len(w):end] == w for w in words):
                reachable.add(end)
        assert len(tokens) in reachable, f"fact {index} was placed inside a word"


def test_examples_are_reproducible_from_the_seed() -> None:
    a = TASK.example(np.random.default_rng(5), 512, 8)
    b = TASK.example(np.random.default_rng(5), 512, 8)
    c = TASK.example(np.random.default_rng(6), 512, 8)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    assert a.questions == b.questions
    assert not np.array_equal(a.token_ids, c.token_ids)


def test_impossible_prompts_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        TASK.example(np.random.default_rng(0), 64, 2, facts=200)
    with pytest.raises(ValueError, match="cannot fit"):
        TASK.example(np.random.default_rng(0), 64, 8, facts=4)
    with pytest.raises(ValueError, match="syllables"):
        RetrievalTask(syllables=500)


def test_task_file_round_trip_and_tokenizer(tmp_path) -> None:
    task = RetrievalTask(keys=40, values=8, fact_density=0.1)
    task.save(tmp_path)
    assert RetrievalTask.load(tmp_path) == task
    with pytest.raises(FileNotFoundError, match="not a retrieval checkpoint"):
        RetrievalTask.load(tmp_path / "missing")
    tokenizer = build_tokenizer(task)
    assert len(tokenizer) == task.vocab_size
    example = task.example(np.random.default_rng(1), 200, 4)
    text = tokenizer.decode(example.token_ids.tolist())
    assert tokenizer(text, add_special_tokens=False).input_ids == example.token_ids.tolist()
    assert tokenizer.convert_ids_to_tokens([task.first_fact + 3 * task.values + 5, task.first_question + 3,
                                            task.first_value + 5]) == ["k3=v5", "k3", "v5"]
