"""The retrieval task rendered as text, for any tokenizer: `key 4821 = 573` lines spliced into
a text file's tokens, and questions `key 4821 =` at the end whose answer is ` 573`.

The same structure as `RetrievalTask` (distinct keys, most facts never asked, the questions in
the prompt's last block), so a hub model can be measured the way the shipped checkpoint is.
Every piece is tokenized on its own and the pieces are concatenated, so a fact's value and its
answer are the same tokens and needles can be located exactly.
"""

from __future__ import annotations

import numpy as np

from kvevict.evaluation.retrieval_task import Question, RetrievalExample


class TextRetrievalTask:
    """Facts hidden in `text` (the haystack), asked at the end."""

    def __init__(self, tokenizer, text: str, fact_density: float = 1 / 64, key_digits: int = 4,
                 value_digits: int = 3) -> None:
        self.tokenizer = tokenizer
        self.fact_density = fact_density
        self.key_digits = key_digits
        self.value_digits = value_digits
        self.haystack = np.asarray(self._encode(text), dtype=np.int64)
        distinct = np.unique(self.haystack)
        pieces = [tokenizer.decode([int(t)]) for t in distinct]
        ends_line = {int(t) for t, piece in zip(distinct, pieces) if "\n" in piece and not piece.rsplit("\n", 1)[1].strip()}
        # Facts go after a token that ends a line (or a newline and indentation), so no word of
        # the haystack is cut.
        self._line_ends = np.flatnonzero(np.isin(self.haystack, list(ends_line))) + 1
        self._bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids

    def _fact(self, key: int, value: int) -> tuple[list[int], list[int], list[int]]:
        """(question prefix, value, line end) tokens of one fact."""
        return (self._encode(f"key {key:0{self.key_digits}d} ="), self._encode(f" {value:0{self.value_digits}d}"),
                self._encode("\n"))

    def example(self, rng: np.random.Generator, context_tokens: int, questions: int,
                facts: int | None = None) -> RetrievalExample:
        facts = max(questions, round(self.fact_density * context_tokens)) if facts is None else facts
        if not 1 <= questions <= facts <= 10 ** self.key_digits:
            raise ValueError(f"cannot ask {questions} questions of {facts} facts with {self.key_digits}-digit keys")
        keys = rng.choice(10 ** self.key_digits, facts, replace=False)
        values = rng.integers(0, 10 ** self.value_digits, facts)
        rendered = [self._fact(int(k), int(v)) for k, v in zip(keys, values)]
        fact_tokens = sum(len(p) + len(v) + len(e) for p, v, e in rendered)
        filler_tokens = context_tokens - len(self._bos) - fact_tokens
        if filler_tokens < 1 or filler_tokens >= self.haystack.size:
            raise ValueError(f"{facts} facts ({fact_tokens} tokens) do not fit a {context_tokens}-token context "
                             f"of a {self.haystack.size}-token text")
        start = int(rng.integers(0, self.haystack.size - filler_tokens + 1))
        filler = self.haystack[start: start + filler_tokens]
        ends = self._line_ends[(self._line_ends > start) & (self._line_ends < start + filler_tokens)] - start
        slots = np.sort(rng.choice(ends if ends.size else np.arange(filler_tokens + 1), facts, replace=True))
        ids: list[int] = list(self._bos)
        value_positions = []
        previous = 0
        for slot, (prefix, value, end) in zip(slots, rendered):
            ids += filler[previous:slot].tolist() + prefix
            value_positions.append(tuple(range(len(ids), len(ids) + len(value))))
            ids += value + end
            previous = slot
        ids += filler[previous:].tolist()
        asked = rng.choice(facts, questions, replace=False)
        question_list = []
        for index in asked:
            prefix, value, end = rendered[index]
            ids += end + prefix
            question_list.append(Question(answer_start=len(ids), answer_ids=tuple(value),
                                          needle_positions=value_positions[index]))
            ids += value
        return RetrievalExample(token_ids=np.asarray(ids, dtype=np.int64), context_tokens=context_tokens,
                                questions=tuple(question_list),
                                fact_positions=np.asarray([p[0] for p in value_positions], dtype=np.int64))
