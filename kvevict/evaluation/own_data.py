"""A researcher's own evaluation data: RULER/LongBench-style JSONL, one record per line, read
into the suite's record shape (what `answer_prompt` and the results rows need).

    context         non-empty str, required: everything before the question (what is evicted)
    question        non-empty str, required: read after the context, never evicted
    answers         non-empty list of non-empty str, required (one str is taken as [str])
    id              str (or int), default: the 0-based index of the line in the file ("3")
    task            str, default "data": the tables average per task
    metric          "all" | "any" (kvevict.evaluation.suite_metric), default "all"
    max_new_tokens  int >= 1, default: the caller's (`kvevict eval --max-new-tokens`)
    length          int >= 1, default: the context's token count rounded up to a power of two
                    (900 tokens: 1024; fill_lengths); the full-cache table has one column per
                    length, so records of about the same length share one

Other fields are ignored (LongBench records carry several). Blank lines are skipped; a bad
record raises ValueError naming the file, the line and the field, e.g.
`data.jsonl:3: "answers" must be a non-empty list of strings`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvevict.evaluation.suite_metric import METRICS
from kvevict.evaluation.suite_runner import encode

DEFAULT_TASK = "data"
DEFAULT_METRIC = "all"


def read_records(path: str | Path, max_new_tokens: int = 32) -> list[dict]:
    """The records of a JSONL file in the suite's shape (`length` None where the file has none)."""
    path = Path(path)
    records: list[dict] = []
    first_line: dict[str, int] = {}
    # Split on "\n" only: JSON text may hold U+2028 and other characters str.splitlines splits on.
    for index, raw in enumerate(path.read_bytes().split(b"\n")):
        where = f"{path}:{index + 1}"
        if not raw.strip():
            continue
        try:
            record = _record(json.loads(raw.decode("utf-8-sig")), str(index), max_new_tokens)
        except UnicodeDecodeError as error:
            raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if record["id"] in first_line:
            raise ValueError(f'{where}: "id" {record["id"]!r} repeats line {first_line[record["id"]]}\'s; ids must '
                             'be unique (a record without an "id" has its 0-based line index)')
        first_line[record["id"]] = index + 1
        records.append(record)
    if not records:
        raise ValueError(f'{path}: no records (one JSON object per line, with "context", "question", "answers")')
    return records


def fill_lengths(records: Sequence[dict], tokenizer) -> list[dict]:
    """The records with `length` set to the context's token count (as answer_prompt encodes it)
    rounded up to a power of two, wherever the file gave none: a column per distinct count
    would make the full-cache table as wide as the data."""
    return [record if record["length"] is not None else {**record, "length": length_class(len(encode(tokenizer, record)[0]))}
            for record in records]


def length_class(tokens: int) -> int:
    """The power of two at or above `tokens` (1 for 0 or 1)."""
    return 1 << max(0, tokens - 1).bit_length()


def _record(value: object, default_id: str, max_new_tokens: int) -> dict:
    """One line's record; ValueError names the field (the caller adds the file and line)."""
    if not isinstance(value, dict):
        raise ValueError(f"a record is a JSON object, got {type(value).__name__}")
    for field in ("context", "question", "answers"):
        if field not in value:
            raise ValueError(f'"{field}" is missing (required: "context", "question", "answers")')
    for field in ("context", "question"):
        # Empty, nothing would be evicted (context) or no answer decoded after eviction (question).
        if not isinstance(value[field], str) or not value[field]:
            raise ValueError(f'"{field}" must be a non-empty string, got {_short(value[field])}')
    answers = [value["answers"]] if isinstance(value["answers"], str) else value["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f'"answers" must be a non-empty list of strings, got {_short(value["answers"])}')
    if not all(answers):
        raise ValueError('"answers" must be a non-empty list of strings, none empty ("" matches every prediction)')
    record_id = _optional(value, "id", default_id)
    if isinstance(record_id, int) and not isinstance(record_id, bool):
        record_id = str(record_id)  # numeric ids, as some datasets have; the results CSV holds text
    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f'"id" must be a non-empty string, got {_short(record_id)}')
    task = _optional(value, "task", DEFAULT_TASK)
    if not isinstance(task, str) or not task:
        raise ValueError(f'"task" must be a non-empty string, got {_short(task)}')
    metric = _optional(value, "metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise ValueError(f'"metric" must be one of {", ".join(map(repr, METRICS))}, got {_short(metric)}')
    return {"id": record_id, "task": task, "length": _count(value, "length", None),
            "context": value["context"], "question": value["question"], "answers": answers, "metric": metric,
            "max_new_tokens": _count(value, "max_new_tokens", max_new_tokens)}


def _optional(value: dict, field: str, default: object) -> object:
    """An optional field's value; absent or null: the default."""
    return default if value.get(field) is None else value[field]


def _count(value: dict, field: str, default: int | None) -> int | None:
    if value.get(field) is None:
        return default
    number = value[field]
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f'"{field}" must be an integer >= 1, got {_short(number)}')
    return number


def _short(value: object, limit: int = 60) -> str:
    """A value as JSON, cut for an error message (a context can be megabytes)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
