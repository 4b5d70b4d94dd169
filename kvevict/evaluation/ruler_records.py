"""The prompt file: JSONL, one record per prompt, UTF-8, written once so that every system is fed
the same bytes. A record's fields, in this order:

    id              "task/length/index" (index zero-padded to 4 digits), unique in a file
    task, family    the task's name and its family (niah, variable_tracking, word_extraction, ...)
    length          the target prompt length in tokens of the generating tokenizer (BOS included)
    seed            the suite's seed; with task, length and index it regenerates the record
    context         everything before the question (evictable)
    question        appended after the context; the model's answer follows it ("" for bpb)
    answers         the gold strings ([] for bpb)
    metric          "all" | "any" (kvevict.evaluation.suite_metric) | "bpb" (teacher-forced)
    max_new_tokens  greedy decoding budget (0 for bpb)
    depth           the needle's depth in [0, 1] where it applies, else null

    >>> from kvevict.evaluation.ruler_records import read_prompts  # doctest: +SKIP
    >>> records = read_prompts("suite.jsonl")                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

FIELDS = ("id", "task", "family", "length", "seed", "context", "question", "answers", "metric",
          "max_new_tokens", "depth")
METRICS = ("all", "any", "bpb")


def validate_record(record: dict) -> None:
    """Raises ValueError naming the first field of `record` that breaks the format."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, got {type(record).__name__}")
    if tuple(record) != FIELDS:
        missing = [f for f in FIELDS if f not in record]
        unknown = [f for f in record if f not in FIELDS]
        raise ValueError(f"fields: expected {list(FIELDS)} in this order; missing {missing}, unknown {unknown}")
    for field in ("id", "task", "family", "context", "question", "metric"):
        if not isinstance(record[field], str):
            raise ValueError(f"{field}: a string is needed, got {record[field]!r}")
    for field in ("length", "seed", "max_new_tokens"):
        value = record[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{field}: a non-negative integer is needed, got {value!r}")
    if record["length"] < 1:
        raise ValueError(f"length: must be >= 1, got {record['length']}")
    parts = record["id"].split("/")
    if len(parts) != 3 or parts[0] != record["task"] or parts[1] != str(record["length"]) or not parts[2].isdigit():
        raise ValueError(f"id: {record['id']!r} is not '{record['task']}/{record['length']}/<index>'")
    if record["metric"] not in METRICS:
        raise ValueError(f"metric: {record['metric']!r} is not one of {METRICS}")
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) and a for a in answers):
        raise ValueError(f"answers: a list of non-empty strings is needed, got {answers!r}")
    if record["metric"] == "bpb":
        if answers or record["question"] or record["max_new_tokens"]:
            raise ValueError("metric 'bpb': answers must be [], question '' and max_new_tokens 0")
    else:
        if not answers or record["max_new_tokens"] < 1:
            raise ValueError(f"metric {record['metric']!r}: needs answers and max_new_tokens >= 1")
        if any(a in record["question"] for a in answers):
            raise ValueError("question: contains an answer")
    depth = record["depth"]
    if depth is not None and (not isinstance(depth, float | int) or isinstance(depth, bool) or not 0 <= depth <= 1):
        raise ValueError(f"depth: null or a number in [0, 1] is needed, got {depth!r}")


def dumps_record(record: dict) -> str:
    """One line of the prompt file (validated)."""
    validate_record(record)
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_prompts(records: Iterable[dict], path: str | Path) -> int:
    """Writes the records as a prompt file; returns how many. Refuses a repeated id."""
    seen: set[str] = set()
    lines = []
    for record in records:
        if record["id"] in seen:
            raise ValueError(f"id: {record['id']!r} appears twice")
        seen.add(record["id"])
        lines.append(dumps_record(record))
    Path(path).write_bytes("".join(lines).encode("utf-8"))
    return len(lines)


def read_prompts(path: str | Path) -> list[dict]:
    """The records of a prompt file, each validated (an error names the line)."""
    records, seen = [], set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            validate_record(record)
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}:{number}: {error}") from error
        if record["id"] in seen:
            raise ValueError(f"{path}:{number}: id {record['id']!r} appears twice")
        seen.add(record["id"])
        records.append(record)
    return records
