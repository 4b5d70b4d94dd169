"""A synthetic long-range retrieval task: key -> value facts hidden in a haystack, asked at the end.

A sequence is `<|bos|>`, a context of filler words with facts `k17=v5` (one token per key and
value) scattered between the words, then questions: a key token `k17`, whose next token must be
that fact's value `v5`. Keys are distinct within a sequence; most facts are never asked
(distractors), so nothing but the question tells which facts matter, and facts and distractors
share one vocabulary, so their tokens alone cannot tell them apart either.

The filler is a language of its own: words of 1-4 syllable tokens from a fixed, seeded lexicon,
drawn with Zipf frequencies. Its next token is predictable only from the tokens just before it,
so a model trained on whole sequences learns local attention for the haystack, as language models
do on text, and long-range attention only for the questions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID = 0
TASK_FILE = "retrieval_task.json"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Question:
    """One question of an example: the answer's tokens and where the answer sits in the context."""

    answer_start: int  # position of the first answer token; the logits before it predict it
    answer_ids: tuple[int, ...]
    needle_positions: tuple[int, ...]  # positions of the answer's tokens in the context


@dataclass(frozen=True)
class RetrievalExample:
    """One prompt: context (bos + haystack with facts) then the questions with their answers."""

    token_ids: np.ndarray  # (n,) int64
    context_tokens: int  # the questions start at this position
    questions: tuple[Question, ...]
    fact_positions: np.ndarray  # positions of every fact, asked or not


@dataclass(frozen=True)
class RetrievalTask:
    """The vocabulary and the distribution of sequences (everything a checkpoint's task file holds)."""

    syllables: int = 48
    words: int = 256
    max_word_syllables: int = 4
    keys: int = 128
    values: int = 16
    zipf_exponent: float = 1.0
    lexicon_seed: int = 1234
    fact_density: float = 1 / 16  # facts per context token

    def __post_init__(self) -> None:
        if self.syllables > len(_CONSONANTS) * len(_VOWELS):
            raise ValueError(f"at most {len(_CONSONANTS) * len(_VOWELS)} syllables, got {self.syllables}")
        if min(self.syllables, self.words, self.max_word_syllables, self.keys, self.values) < 1:
            raise ValueError("every vocabulary size must be >= 1")

    # -- vocabulary -----------------------------------------------------------------------
    @property
    def first_syllable(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def first_fact(self) -> int:
        """Fact `k=v` is token first_fact + k * values + v."""
        return self.first_syllable + self.syllables

    @property
    def first_question(self) -> int:
        return self.first_fact + self.keys * self.values

    @property
    def first_value(self) -> int:
        return self.first_question + self.keys

    @property
    def vocab_size(self) -> int:
        return self.first_value + self.values

    def token_strings(self) -> list[str]:
        """Every token's text, by id: special tokens, syllables `ba`, facts `k17=v5`, questions
        `k17`, answers `v5`."""
        syllables = [c + v for c in _CONSONANTS for v in _VOWELS][: self.syllables]
        facts = [f"k{k}=v{v}" for k in range(self.keys) for v in range(self.values)]
        return [*SPECIAL_TOKENS, *syllables, *facts, *(f"k{i}" for i in range(self.keys)),
                *(f"v{i}" for i in range(self.values))]

    # -- sequences ------------------------------------------------------------------------
    @cached_property
    def lexicon(self) -> list[np.ndarray]:
        """The filler words as syllable-token ids, fixed by `lexicon_seed`."""
        rng = np.random.default_rng(self.lexicon_seed)
        lengths = rng.integers(1, self.max_word_syllables + 1, self.words)
        return [rng.integers(0, self.syllables, n) + self.first_syllable for n in lengths]

    @cached_property
    def _word_probabilities(self) -> np.ndarray:
        weights = 1.0 / np.arange(1, self.words + 1) ** self.zipf_exponent
        return weights / weights.sum()

    def facts_for(self, context_tokens: int, questions: int) -> int:
        """Facts in a context of `context_tokens`: the density, at least one per question, at
        most one per key."""
        return int(min(self.keys, max(questions, round(self.fact_density * context_tokens))))

    def example(self, rng: np.random.Generator, context_tokens: int, questions: int,
                facts: int | None = None) -> RetrievalExample:
        """A prompt of `context_tokens` context tokens (bos included) and `questions` questions."""
        facts = self.facts_for(context_tokens, questions) if facts is None else facts
        filler_tokens = context_tokens - 1 - facts
        if not 1 <= questions <= facts <= self.keys or filler_tokens < 0:
            raise ValueError(f"cannot fit {facts} facts and {questions} questions in {context_tokens} tokens "
                             f"with {self.keys} keys")
        words = self._filler_words(rng, filler_tokens)
        ends = np.cumsum([len(w) for w in words])
        filler = np.concatenate(words)[:filler_tokens] if words else np.zeros(0, np.int64)
        keys = rng.choice(self.keys, facts, replace=False)
        values = rng.integers(0, self.values, facts)
        # Facts go between words (never inside one), anywhere in the haystack.
        boundaries = np.concatenate([[0], ends[ends < filler_tokens], [filler_tokens]])
        slots = np.sort(rng.choice(boundaries, facts, replace=True))
        # np.insert puts fact i before filler index slots[i]; the +1 is the bos in front.
        fact_positions = 1 + slots + np.arange(facts)
        context = np.insert(filler, slots, self.first_fact + keys * self.values + values)
        asked = rng.choice(facts, questions, replace=False)
        tail = np.stack([self.first_question + keys[asked], self.first_value + values[asked]], axis=1).reshape(-1)
        token_ids = np.concatenate([[BOS_ID], context, tail]).astype(np.int64)
        question_list = tuple(
            Question(answer_start=context_tokens + 2 * i + 1, answer_ids=(int(self.first_value + values[f]),),
                     needle_positions=(int(fact_positions[f]),))
            for i, f in enumerate(asked))
        return RetrievalExample(token_ids=token_ids, context_tokens=context_tokens, questions=question_list,
                                fact_positions=fact_positions)

    def _filler_words(self, rng: np.random.Generator, tokens: int) -> list[np.ndarray]:
        words: list[np.ndarray] = []
        total = 0
        mean = sum(len(w) for w in self.lexicon) / self.words
        while total < tokens:
            draw = rng.choice(self.words, size=max(8, int((tokens - total) / mean * 1.2)), p=self._word_probabilities)
            for index in draw:
                words.append(self.lexicon[index])
                total += len(words[-1])
                if total >= tokens:
                    break
        return words

    # -- files ----------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        path = Path(directory) / TASK_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> RetrievalTask:
        """The task a checkpoint was trained on (its `retrieval_task.json`)."""
        path = Path(directory) / TASK_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: not a retrieval checkpoint (no {TASK_FILE})") from None


def build_tokenizer(task: RetrievalTask):
    """A word-level tokenizer of the task's tokens, split on whitespace, decoded with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(task.token_strings())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[2]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIAL_TOKENS[0],
                                   eos_token=SPECIAL_TOKENS[1], pad_token=SPECIAL_TOKENS[2],
                                   clean_up_tokenization_spaces=False, model_max_length=8192)
