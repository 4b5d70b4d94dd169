"""The suite's score of one prediction: RULER's substring match.

* `all` (RULER's `string_match_all`): the fraction of the answers found in the prediction, so a
  prompt with several answers earns partial credit (3 of 4 values found: 0.75); one answer: 1 or 0.
* `any` (RULER's `string_match_part`): 1 if at least one answer is found, else 0.

The prediction is stripped of surrounding whitespace, and the match ignores case, as RULER's
does (it lowercases both the answer and the prediction). Every runner cuts the generation at
its first newline after some text with `cut_prediction` (the suite's stopping rule). `bpb` records (bits per byte) are
scored by teacher forcing, so they have no string score.

    >>> score("The numbers are 1234567 and 7654321.", ["1234567", "7654321", "1111111"], "all")
    0.6666666666666666
    >>> score(" Hello ", ["hello"], "any")
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("all", "any")


def cut_prediction(text: str) -> str:
    """The generation up to its first newline after some text (the suite's stopping rule)."""
    started = False
    for i, char in enumerate(text):
        if char == "\n" and started:
            return text[:i]
        started = started or not char.isspace()
    return text


def _found(prediction: str, answers: Sequence[str]) -> list[bool]:
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers: a non-empty list of strings is needed, got {answers!r}")
    text = prediction.strip().lower()
    return [answer.lower() in text for answer in answers]


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """The fraction of `answers` that occur in `prediction` (case-insensitive)."""
    found = _found(prediction, answers)
    return sum(found) / len(found)


def string_match_any(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of `answers` occurs in `prediction` (case-insensitive), else 0.0."""
    return float(any(_found(prediction, answers)))


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    """The score in [0, 1] of one prediction under a record's `metric` (`all` or `any`)."""
    if metric == "all":
        return string_match_all(prediction, answers)
    if metric == "any":
        return string_match_any(prediction, answers)
    if metric == "bpb":
        raise ValueError("metric: 'bpb' records are scored by teacher forcing (bits per byte), not by a prediction")
    raise ValueError(f"metric: {metric!r} is not one of {METRICS}")
