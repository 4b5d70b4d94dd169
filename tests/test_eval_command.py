"""`kvevict eval` on the shipped code model (models/demo-py): every configuration's row once per
record, resumed and extended without measuring a row twice, each prediction the suite runner's
for that configuration, the suite's tables and plots; bad records refused by file, line and
field before the model loads."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from kvevict.cli import main
from kvevict.evaluation.own_data import fill_lengths, length_class, read_records
from kvevict.evaluation.suite_grid import method_config
from kvevict.evaluation.suite_metric import score
from kvevict.evaluation.suite_report import FULL_CACHE, read_rows
from kvevict.evaluation.suite_runner import answer_prompt, encode
from kvevict.worker.model_loader import load_model

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo-py"
CODE = ("import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n        return handle.readlines()\n\n\n"
        "MAGIC_NUMBER = 4127\n\n" + "def write_lines(path, lines):\n    with open(path, 'w') as handle:\n"
        "        handle.writelines(lines)\n\n\n" * 6)
RECORDS = [
    {"context": CODE, "question": "assert MAGIC_NUMBER ==", "answers": ["4127"]},
    {"context": CODE, "question": "def read_lines(path):\n    with open(path) as", "answers": "handle",
     "task": "code", "metric": "any", "max_new_tokens": 6},  # one string: one answer
    {"id": "twice", "context": CODE * 2, "question": "def write_lines(path, lines):\n    with",
     "answers": ["open", "path"], "length": 4096},
]
POLICIES = ("caote+tova", "tova")
BLOCK = 32


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _eval(data: Path, out: Path, *flags: str) -> int:
    return main(["eval", "--model", str(SHIPPED), "--data", str(data), "--out", str(out), "--policies",
                 ",".join(POLICIES), "--block-size", str(BLOCK), "--dtype", "float32", "--max-new-tokens", "8",
                 "--no-progress", *flags])


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> tuple[Path, Path, str]:
    """(data file, results directory, stdout) of one run at 20% and 50% kept."""
    root = tmp_path_factory.mktemp("eval")
    # A blank line in the middle: skipped, yet line indices (the default ids) still count it.
    data = _write(root / "data.jsonl", [json.dumps(RECORDS[0]), "", *map(json.dumps, RECORDS[1:])])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert _eval(data, root / "out", "--kept", "0.2", "0.5") == 0
    return data, root / "out", stdout.getvalue()


def test_every_configuration_once_per_record_and_the_suite_tables(measured) -> None:
    data, out, stdout = measured
    rows = read_rows(out / "results.csv")
    ids = ["0", "2", "twice"]
    expected = {(FULL_CACHE, "question_agnostic", 1.0, i) for i in ids}
    expected |= {(m, "question_agnostic", k, i) for m in POLICIES for k in (0.2, 0.5) for i in ids}
    assert len(rows) == len(ids) * (1 + len(POLICIES) * 2 * 1)
    assert {(r.method, r.protocol, r.kept_fraction, r.id) for r in rows} == expected
    assert {r.id: r.task for r in rows} == {"0": "data", "2": "code", "twice": "data"}
    tables = (out / "tables.md").read_text(encoding="utf-8")
    assert "## Full cache per task" in tables and "## question_agnostic" in tables
    assert "| system | method | 20% | 50% | s/prompt |" in tables
    assert all(f"| kvevict | {m} |" in tables for m in (FULL_CACHE, *POLICIES))
    assert "| caote+tova - tova |" in tables and "4096 tokens" in tables  # the record's own length
    assert tables in stdout and f"results -> {out / 'results.csv'}" in stdout
    plots = sorted(out.glob("*.png"))
    assert plots and all(f"plot -> {p}" in stdout for p in plots)


def test_a_rerun_measures_nothing_and_more_kept_fractions_only_their_rows(measured, tmp_path) -> None:
    data, measured_out, _ = measured
    out = tmp_path / "out"
    shutil.copytree(measured_out, out)
    before = (out / "results.csv").read_bytes()
    assert _eval(data, out, "--kept", "0.2", "0.5") == 0
    assert (out / "results.csv").read_bytes() == before
    assert _eval(data, out, "--kept", "0.2", "0.35", "0.5") == 0
    rows = read_rows(out / "results.csv")
    new = rows[len(read_rows(measured_out / "results.csv")):]
    assert sorted((r.method, r.kept_fraction, r.id) for r in new) == sorted(
        (m, 0.35, i) for m in POLICIES for i in ("0", "2", "twice"))
    assert (out / "results.csv").read_bytes().startswith(before)
    assert "| system | method | 20% | 35% | 50% | s/prompt |" in (out / "tables.md").read_text(encoding="utf-8")
    # Rows of another block size would be skipped as done: refused instead.
    assert _eval(data, out, "--block-size", "64") == 2


def test_each_prediction_is_the_suite_runners_for_its_configuration(measured) -> None:
    data, out, _ = measured
    model, tokenizer = load_model(str(SHIPPED), dtype="float32")
    records = {r["id"]: r for r in fill_lengths(read_records(data, max_new_tokens=8), tokenizer)}
    rows = read_rows(out / "results.csv")
    for row in rows:
        record = records[row.id]
        config = None if row.method == FULL_CACHE else method_config(row.method)
        answer = answer_prompt(model, tokenizer, record, config, row.kept_fraction, row.protocol, BLOCK)
        assert row.prediction == answer.prediction, (row.method, row.kept_fraction, row.id)
        assert row.score == score(answer.prediction, record["answers"], record["metric"])
    context_tokens = len(encode(tokenizer, records["0"])[0])
    assert {r.length for r in rows if r.id == "0"} == {length_class(context_tokens)}  # no "length": its class
    assert length_class(context_tokens) >= context_tokens > length_class(context_tokens) // 2
    assert len({r.prediction for r in rows if r.id == "0"}) > 1, "eviction changed no answer: a vacuous check"


def test_one_answer_string_is_a_one_answer_list(measured) -> None:
    data, out, _ = measured
    records = read_records(data, max_new_tokens=8)
    assert [r["answers"] for r in records] == [["4127"], ["handle"], ["open", "path"]]
    assert [r["max_new_tokens"] for r in records] == [8, 6, 8]
    assert [(r["task"], r["metric"]) for r in records] == [("data", "all"), ("code", "any"), ("data", "all")]
    # Scored as the one answer "handle" ("any" of its letters would find some in most predictions).
    for row in (r for r in read_rows(out / "results.csv") if r.id == "2"):
        assert row.score == score(row.prediction, ["handle"], "any")


GOOD = json.dumps({"context": "x = 1\n", "question": "x ==", "answers": ["1"]})


@pytest.mark.parametrize("second,third,message", [
    (json.dumps({"context": "x = 1\n", "question": "x =="}), GOOD, ':2: "answers" is missing'),
    (json.dumps({"context": "x = 1\n", "question": "x ==", "answers": [1]}), GOOD,
     ':2: "answers" must be a non-empty list of strings'),
    (json.dumps({"context": "x = 1\n", "question": "x ==", "answers": []}), GOOD,
     ':2: "answers" must be a non-empty list of strings'),
    (json.dumps({"context": "x = 1\n", "answers": ["1"]}), GOOD, ':2: "question" is missing'),
    (json.dumps({"context": "x = 1\n", "question": "x ==", "answers": ["1"], "metric": "exact"}), GOOD,
     ':2: "metric" must be one of'),
    ('{"context": "x = 1\\n", "question": "x ==", "answers": ["1"]', GOOD, ":2: not valid JSON"),
    (json.dumps({"id": "a", "context": "x\n", "question": "x", "answers": ["1"]}),
     json.dumps({"id": "a", "context": "y\n", "question": "y", "answers": ["1"]}), ':3: "id" \'a\' repeats line 2'),
    ("", json.dumps({"id": "0", "context": "x\n", "question": "x", "answers": ["1"]}),
     ':3: "id" \'0\' repeats line 1'),  # line 1's default id is "0"
])
def test_a_bad_record_exits_2_naming_file_line_and_field_before_the_model_loads(tmp_path, capsys, second, third,
                                                                                 message) -> None:
    data = _write(tmp_path / "data.jsonl", [GOOD, second, third])
    assert _eval(data, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"kvevict: error: {data}{message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [(["--kept", "1.0"], "--kept"), (["--policies", "tova+caote"], "--policies"),
                                           (["--policies", "tova,,h2o"], "--policies"), (["--limit", "0"], "--limit")])
def test_bad_flags_exit_2(tmp_path, capsys, flags, message) -> None:
    data = _write(tmp_path / "data.jsonl", [GOOD])
    assert _eval(data, tmp_path / "out", *flags) == 2
    assert f"kvevict: error: {message}" in capsys.readouterr().err
