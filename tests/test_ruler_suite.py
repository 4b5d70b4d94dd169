"""The RULER-style suite: records are deterministic and stable, hit their length within 2%, place
needles where they say, follow the prompt-file format; the metric scores as RULER does; the
benchmark script writes the same bytes for the same arguments and answers a prompt file."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvevict.evaluation.ruler import TASKS, make_record, statement_starts
from kvevict.evaluation.ruler_fit import DEPTH_PERCENTS, insert_at_depths, spread_depth
from kvevict.evaluation.ruler_haystacks import PROSE_JOINER
from kvevict.evaluation.ruler_records import FIELDS, read_prompts, validate_record, write_prompts
from kvevict.evaluation.ruler_sources import CODE_FILES, NOISE, code_file, prose_sentences
from kvevict.evaluation.suite_metric import score, string_match_all, string_match_any

from tests.checkpoints import save_tiny_checkpoint
from tests.script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "ruler_suite.py"
DEMO = ROOT / "models" / "demo-py"
NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids) for ([a-z]+-[a-z]+) is: ([0-9a-f-]+)\.")
# The tiny tokenizer is nearly byte-level on English, so 2048 tokens is its shortest prompt that
# holds every task's fixed part (CWE's worked example and common words, VT's worked example).
TINY_LENGTH = 2048


@pytest.fixture(scope="module")
def demo_tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return AutoTokenizer.from_pretrained(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def _tokens(tokenizer, record: dict) -> int:
    return len(tokenizer(record["context"] + record["question"], verbose=False)["input_ids"])


# -- determinism ------------------------------------------------------------------------------------
def _generate(out: Path, hash_seed: str, n: int = 2) -> bytes:
    command = [sys.executable, str(SCRIPT), "generate", "--model", str(DEMO), "--lengths", "1024", "--n", str(n),
               "--seeds", "3", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| niah_single_number_noise | 2, " in done.stdout  # the table: records, mean tokens
    return out.read_bytes()


def test_the_same_arguments_write_the_same_bytes(tmp_path) -> None:
    first = _generate(tmp_path / "a.jsonl", "1")
    second = _generate(tmp_path / "b.jsonl", "2")  # another process, another str hash
    assert first == second
    records = [json.loads(line) for line in first.decode("utf-8").splitlines()]
    assert [r["id"] for r in records] == [f"{task}/1024/{i:04d}" for task in TASKS for i in range(2)]


def test_a_record_does_not_change_when_others_are_added(demo_tokenizer) -> None:
    generate = load_script(SCRIPT).generate
    few = generate(demo_tokenizer, ["niah_single_number_prose", "variable_tracking"], [1024], 2, seeds=[5])
    more = generate(demo_tokenizer, list(TASKS), [1024, 2048], 3, seeds=[5])
    by_id = {r["id"]: r for r in more}
    assert few and all(by_id[r["id"]] == r for r in few)
    # Each (seed, task, length, index) has its own draws: the seed, the task, the length and the
    # index each change a record's values.
    base = by_id["niah_single_number_noise/1024/0000"]["answers"]
    assert base != make_record("niah_single_number_noise", demo_tokenizer, 1024, 0, seed=6)["answers"]
    assert base != by_id["niah_single_number_prose/1024/0000"]["answers"]
    assert base != by_id["niah_single_number_noise/2048/0000"]["answers"]
    assert base != by_id["niah_single_number_noise/1024/0001"]["answers"]


def test_several_seeds_run_the_indices_on_and_keep_each_seeds_records(demo_tokenizer) -> None:
    generate = load_script(SCRIPT).generate
    both = generate(demo_tokenizer, ["niah_multikey_1"], [1024], 2, seeds=[4, 9])
    assert [(r["id"], r["seed"]) for r in both] == [(f"niah_multikey_1/1024/{i:04d}", s)
                                                   for i, s in ((0, 4), (1, 4), (2, 9), (3, 9))]
    assert both[:2] == generate(demo_tokenizer, ["niah_multikey_1"], [1024], 2, seeds=[4])
    assert both[2] == make_record("niah_multikey_1", demo_tokenizer, 1024, 2, seed=9)


# -- lengths ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_tiny_tokenizer_prompts_are_within_two_percent(tiny_tokenizer, task) -> None:
    for index in range(2):
        record = make_record(task, tiny_tokenizer, TINY_LENGTH, index)
        assert 0.98 * TINY_LENGTH <= _tokens(tiny_tokenizer, record) <= TINY_LENGTH


@pytest.mark.parametrize("length", [1024, 4096])
def test_real_tokenizer_prompts_are_within_two_percent(demo_tokenizer, length) -> None:
    for task in TASKS:
        record = make_record(task, demo_tokenizer, length, 1)
        assert 0.98 * length <= _tokens(demo_tokenizer, record) <= length, task


def test_a_length_the_task_cannot_reach_is_a_clear_error(tiny_tokenizer) -> None:
    with pytest.raises(ValueError, match=r"common_words at 1024 tokens: the smallest prompt .* more than the target"):
        make_record("common_words", tiny_tokenizer, 1024, 0)
    with pytest.raises(ValueError, match="task: 'niah' is not one of"):
        make_record("niah", tiny_tokenizer, 1024, 0)


# -- needles ------------------------------------------------------------------------------------------
def test_spread_depths_cover_rulers_grid_evenly_for_every_prefix() -> None:
    depths = [spread_depth(i) for i in range(40)]
    assert depths[:3] == [0.0, 1.0, 0.49] and sorted(depths) == [p / 100 for p in DEPTH_PERCENTS]
    for n in (3, 5, 9):  # no gap between neighbouring depths of a prefix is more than twice another
        gaps = [b - a for a, b in zip(sorted(depths[:n]), sorted(depths[:n])[1:])]
        assert max(gaps) <= 2 * min(gaps) + 0.03
    assert spread_depth(40) == spread_depth(0)


def test_insert_at_depths_picks_the_nearest_boundary() -> None:
    segments = ["aaaa", "bbbb", "cccc", "dddd"]  # boundaries at characters 0, 5, 10, 15, 19
    assert insert_at_depths(segments, [(0.0, "N")], " ") == ["N", *segments]
    assert insert_at_depths(segments, [(1.0, "N")], " ") == [*segments, "N"]
    assert insert_at_depths(segments, [(0.5, "N")], " ") == ["aaaa", "bbbb", "N", "cccc", "dddd"]
    assert insert_at_depths(segments, [(0.3, "M"), (0.3, "N")], " ") == ["aaaa", "M", "N", "bbbb", "cccc", "dddd"]


def _realized_depth(context: str, start: int, needle: str, joiner: str) -> tuple[float, int]:
    """(depth of `needle` in the haystack context[start:] without it, the haystack's characters)."""
    haystack = context[start:]
    position = haystack.index(needle)
    total = len(haystack) - len(needle) - len(joiner)
    return position / total, total


@pytest.mark.parametrize("task,joiner,unit", [
    ("niah_single_number_noise", "\n", len(NOISE)),
    ("niah_single_uuid_prose", " ", max(map(len, prose_sentences()))),
    ("niah_multikey_1", " ", max(map(len, prose_sentences()))),
    ("niah_multikey_2", "\n", 80),
])
def test_the_asked_needle_is_in_the_context_at_its_depth(demo_tokenizer, task, joiner, unit) -> None:
    for index in range(5):  # depths 0, 1, 0.49, 0.23, 0.74
        record = make_record(task, demo_tokenizer, 1024, index)
        context, question, (value,) = record["context"], record["question"], record["answers"]
        needles = NEEDLE.findall(context)
        asked = [key for key, v in needles if v == value]
        assert len(asked) == 1 and context.count(value) == 1
        key = asked[0]
        assert key in question and value not in question
        assert context.count(key) == 1  # no distractor shares the asked key
        if task == "niah_multikey_1":
            assert len(needles) == 4
        if task == "niah_multikey_2":
            assert len(needles) > 20 and len({k for k, _ in needles}) == len(needles)
        needle = f"One of the special magic {'uuids' if 'uuid' in task else 'numbers'} for {key} is: {value}."
        head = context.index("\n") + 1  # the instruction line
        depth, total = _realized_depth(context, head, needle, joiner)
        # The needle sits at the segment boundary nearest to the depth: half a segment away at most,
        # and other needles shift it by at most their own length.
        slack = (unit / 2 + len(joiner) + 3 * (len(needle) + 1)) / total
        assert abs(depth - record["depth"]) <= slack, (index, depth, record["depth"])


def test_multi_answer_needles_are_all_in_the_context_and_not_in_the_question(demo_tokenizer) -> None:
    for task, keys, asked in (("niah_multivalue", 1, 1), ("niah_multiquery", 4, 4)):
        record = make_record(task, demo_tokenizer, 2048, 0)
        needles = NEEDLE.findall(record["context"])
        assert len(needles) == 4 and len({k for k, _ in needles}) == keys
        assert sorted(v for _, v in needles) == sorted(record["answers"]) and record["depth"] is None
        assert sum(key in record["question"] for key in {k for k, _ in needles}) == asked
        assert record["question"].startswith("\nWhat are all the special magic numbers for ")
        assert not any(answer in record["question"] for answer in record["answers"])


def test_variable_tracking_answers_the_asked_chain(demo_tokenizer) -> None:
    record = make_record("variable_tracking", demo_tokenizer, 2048, 0)
    context = record["context"][record["context"].rindex("Memorize and track"):]  # after the worked example
    value = re.search(r"assigned the value (\d+) in the text above", record["question"]).group(1)
    assignments = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)", context))
    assert len(assignments) == 10  # two chains of five
    resolved = {}
    for name, source in assignments.items():  # chains read in order, so one pass resolves them
        resolved[name] = resolved[source[4:]] if source.startswith("VAR ") else source
    assert sorted(n for n, v in resolved.items() if v == value) == sorted(record["answers"])
    assert len(record["answers"]) == 5 and f"5 variables are assigned the value {value}" in record["question"]


def test_common_words_answers_are_the_most_common(demo_tokenizer) -> None:
    record = make_record("common_words", demo_tokenizer, 2048, 0)
    listing = record["context"][record["context"].rindex("most often.\n") + len("most often.\n"):]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    fewest_common = min(counts[w] for w in record["answers"])
    assert len(record["answers"]) == 10 and fewest_common == 6
    assert max(c for w, c in counts.items() if w not in record["answers"]) == 1
    assert not any(answer in record["question"].lower() for answer in record["answers"])


def test_frequent_words_answers_are_the_three_most_frequent_after_the_dots(demo_tokenizer) -> None:
    record = make_record("frequent_words", demo_tokenizer, 2048, 0)
    words = record["context"].split("coded words. ", 1)[1].split(" ")
    ranked = [w for w, _ in Counter(words).most_common()]
    assert ranked[0] == "..." and ranked[1:4] == record["answers"]


def test_code_recall_inserts_the_constant_as_a_statement_at_its_depth(demo_tokenizer) -> None:
    for index in range(4):
        record = make_record("code_recall", demo_tokenizer, 1024, index)
        context, (value,) = record["context"], record["answers"]
        match = re.search(rf"^( *)MAGIC_NUMBER_(\d+) = {value}\n", context, re.MULTILINE)
        assert match and record["question"] == f"\nassert MAGIC_NUMBER_{match.group(2)} =="
        assert value not in record["question"]
        without = context[:match.start()] + context[match.end():]
        source = next(code_file(name) for name in CODE_FILES if code_file(name).startswith(without))
        # The same insertion into the whole file is valid Python.
        ast.parse(source[:match.start()] + match.group(0) + source[match.start():])
        assert abs(match.start() / len(without) - record["depth"]) <= 0.05, index


def test_statement_starts_keep_the_file_valid() -> None:
    source = code_file("textwrap.py")
    starts = statement_starts(source)
    lines = source.splitlines(keepends=True)
    assert len(starts) > 100 and any(indent >= 8 for _, indent in starts)
    for line, indent in starts[::7]:
        ast.parse("".join(lines[:line]) + " " * indent + "MAGIC_NUMBER_1 = 1\n" + "".join(lines[line:]))


def test_text_bpb_is_plain_prose_without_a_question(demo_tokenizer) -> None:
    record = make_record("text_bpb", demo_tokenizer, 1024, 0)
    assert (record["question"], record["answers"], record["metric"], record["max_new_tokens"]) == ("", [], "bpb", 0)
    first = record["context"].split(". ")[0] + "."
    assert first in prose_sentences() and PROSE_JOINER.join(prose_sentences()).count(record["context"][:200]) >= 1


# -- format ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_record_follows_the_format(demo_tokenizer, tmp_path, task) -> None:
    record = make_record(task, demo_tokenizer, 1024, 2, seed=1)
    validate_record(record)
    assert tuple(record) == FIELDS and record["id"] == f"{task}/1024/0002" and record["family"]
    assert record["metric"] == ("bpb" if task == "text_bpb" else "all")
    assert not any(answer in record["question"] for answer in record["answers"])
    path = tmp_path / "one.jsonl"
    write_prompts([record], path)
    assert read_prompts(path) == [record]


def test_bad_records_name_the_field(demo_tokenizer, tmp_path) -> None:
    good = make_record("niah_single_number_noise", demo_tokenizer, 1024, 0)
    cases = [
        ({k: v for k, v in good.items() if k != "depth"}, r"fields: .*missing \['depth'\]"),
        ({**good, "metric": "exact"}, "metric: 'exact' is not one of"),
        ({**good, "question": good["question"] + " " + good["answers"][0]}, "question: contains an answer"),
        ({**good, "depth": 1.5}, "depth: null or a number in"),
        ({**good, "answers": "1234567"}, "answers: a list of non-empty strings"),
        ({**good, "id": "other/1024/0000"}, "id: 'other/1024/0000' is not"),
        ({**good, "max_new_tokens": 0}, "needs answers and max_new_tokens >= 1"),
    ]
    for record, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_record(record)
    with pytest.raises(ValueError, match="appears twice"):
        write_prompts([good, good], tmp_path / "twice.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "length": -1}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: length: a non-negative integer"):
        read_prompts(tmp_path / "bad.jsonl")


# -- metric ----------------------------------------------------------------------------------------
def test_metric_all_gives_partial_credit_and_any_needs_one() -> None:
    answers = ["1111111", "2222222", "3333333", "4444444"]
    prediction = "The numbers are 1111111, 2222222 and 4444444."
    assert string_match_all(prediction, answers) == 0.75 == score(prediction, answers, "all")
    assert string_match_any(prediction, answers) == 1.0 == score(prediction, answers, "any")
    assert score("none of them", answers, "all") == 0.0 == score("none of them", answers, "any")
    assert score("1111111", ["1111111"], "all") == 1.0
    assert score("111111", ["1111111"], "all") == 0.0  # a prefix of the value is not the value


def test_metric_ignores_case_and_surrounding_whitespace_like_ruler() -> None:
    assert score("  HLDZG, bsywz\n", ["hldzg", "BSYWZ"], "all") == 1.0
    assert score("\n\t 7d2e-AB \n", ["7d2e-ab"], "any") == 1.0
    assert score("12 34", ["1234"], "all") == 0.0  # whitespace inside is kept


def test_metric_refuses_what_it_cannot_score() -> None:
    with pytest.raises(ValueError, match="metric: 'exact' is not one of"):
        score("x", ["x"], "exact")
    with pytest.raises(ValueError, match="answers: a non-empty list"):
        score("x", [], "all")
    with pytest.raises(ValueError, match="answers: a non-empty list"):
        score("x", "x", "any")
    with pytest.raises(ValueError, match="'bpb' records are scored by teacher forcing"):
        score("x", ["x"], "bpb")


# -- the script --------------------------------------------------------------------------------------
def test_generate_refuses_bad_arguments(capsys) -> None:
    parse = load_script(SCRIPT).parse_args
    for argv, message in ((["--n", "0"], "--n: at least 1"), (["--out", "x.json"], "--out: the prompt file is JSONL"),
                          (["--lengths", "0"], "--lengths: lengths are positive")):
        with pytest.raises(SystemExit) as raised:
            parse(["generate", "--model", str(DEMO), "--out", "x.jsonl", *argv])
        assert raised.value.code == 2 and message in capsys.readouterr().err


def test_cut_prediction_stops_at_the_first_newline_after_text() -> None:
    from kvevict.evaluation.suite_metric import cut_prediction as cut
    assert cut("\n\n 1234567\nmore") == "\n\n 1234567"
    assert cut(" a b") == " a b" and cut("\n \n") == "\n \n"


def test_full_cache_answers_a_prompt_file(tmp_path) -> None:
    model = save_tiny_checkpoint(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = tmp_path / "suite.jsonl"
    write_prompts([make_record(task, tokenizer, TINY_LENGTH, 0) for task in ("niah_single_number_noise", "text_bpb")],
                  prompts)
    out = tmp_path / "full.csv"
    done = subprocess.run([sys.executable, str(SCRIPT), "full-cache", "--model", str(model), "--prompts", str(prompts),
                           "--out", str(out), "--dtype", "float32"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == load_script(SCRIPT).RESULT_FIELDS
    assert [r["task"] for r in rows] == ["niah_single_number_noise", "text_bpb"]
    assert float(rows[0]["score"]) in (0.0, 1.0) and "\n" not in rows[0]["prediction"].strip()
    assert 0.5 < float(rows[1]["score"]) < 20  # bits per byte of a random model: about log2(vocab) / bytes per token
    assert "| niah_single_number_noise | " in done.stdout and "bpb +-" in done.stdout
