"""benchmarks/quality.py end to end on a tiny configuration: the shipped checkpoints, the whole
grid, short prompts. The CSV has a row for every combination asked for, with finite numbers."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kvevict.evaluation import grid
from kvevict.evaluation.retrieval_task import RetrievalTask

from tests.script_loader import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
BUDGETS = ("0.25", "0.5")
SEEDS = 2



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    command = [sys.executable, str(SCRIPT), "--context", "128", "--block-size", "32", "--budgets", *BUDGETS,
               "--seeds", str(SEEDS), "--examples", "1", "--questions", "4", "--windows", "1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_csv_has_a_row_for_every_combination(run) -> None:
    out, _ = run
    with open(out / "quality.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    configs = grid.configurations()
    expected = {(task, c.name, c.allocator, b, s) for task in ("retrieval", "text") for c in configs
                for b in BUDGETS for s in map(str, range(SEEDS))}
    expected |= {(task, "full cache", "uniform", "1", s) for task in ("retrieval", "text") for s in map(str, range(SEEDS))}
    got = [(r["task"], r["policy"], r["allocator"], r["budget_fraction"], r["seed"]) for r in rows]
    assert len(got) == len(set(got)) == len(expected)
    assert set(got) == expected
    for row in rows:
        if row["task"] == "retrieval":
            assert int(row["facts"]) == RetrievalTask.load(ROOT / "models" / "retrieval").facts_for(128, 4)
            assert 0.0 <= float(row["accuracy"]) <= 1.0 and 0.0 <= float(row["needle_kept"]) <= 1.0
        else:
            assert math.isfinite(float(row["bits_per_byte"])) and math.isfinite(float(row["bpb_gap"]))
        if row["policy"] == "full cache":
            assert (float(row["needle_kept"]) == 1.0 if row["task"] == "retrieval" else float(row["bpb_gap"]) == 0.0)
        else:
            assert int(row["budget_tokens"]) == round(float(row["budget_fraction"]) * 128)


def test_markdown_and_plots_are_written(run) -> None:
    out, done = run
    text = (out / "quality.md").read_text()
    for heading in ("## retrieval", "### needle kept (retrieval)", "## text", "### caote minus no wrapper (retrieval",
                    "### allocators (text)"):
        assert heading in text
    assert "| caote+snapkv |" in text and "| control: value norm |" in text
    for name in ("retrieval_by_base.png", "text_by_base.png", "retrieval_allocators.png", "text_allocators.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "runs in" in done.stdout and "quality" in done.stderr  # the progress bar


def test_tasks_run_apart_merge_into_the_same_outputs(run, tmp_path) -> None:
    out, _ = run
    with open(out / "quality.csv", newline="") as handle:
        lines = handle.read().splitlines()
    header, body = lines[0], lines[1:]
    parts = []
    for task in ("retrieval", "text"):
        part = tmp_path / f"{task}.csv"
        part.write_text("\n".join([header, *(line for line in body if line.startswith(task + ","))]) + "\n")
        parts.append(part)
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, str(SCRIPT), "--from-csv", *map(str, parts), "--out", str(merged),
                           "--no-plots"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted((merged / "quality.csv").read_text().splitlines()) == sorted(lines)
    assert (merged / "quality.md").read_text() == (out / "quality.md").read_text()
    twice = subprocess.run([sys.executable, str(SCRIPT), "--from-csv", str(parts[0]), str(parts[0]), "--out",
                            str(tmp_path / "twice"), "--no-plots"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert twice.returncode == 2 and "same run twice" in twice.stderr
    other = tmp_path / "other-facts.csv"  # the retrieval rows again, as if measured with more facts
    header_fields = header.split(",")
    column = header_fields.index("facts")
    rows = [line.split(",") for line in parts[0].read_text().splitlines()[1:]]
    other.write_text("\n".join([header, *(",".join(r[:column] + ["99"] + r[column + 1:]) for r in rows)]) + "\n")
    mixed = subprocess.run([sys.executable, str(SCRIPT), "--from-csv", str(parts[0]), str(other), "--out",
                            str(tmp_path / "mixed"), "--no-plots"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert mixed.returncode == 2 and "different setups" in mixed.stderr
    junk = tmp_path / "junk.csv"
    junk.write_text("name,score\nh2o,1\n")
    refused = subprocess.run([sys.executable, str(SCRIPT), "--from-csv", str(junk), "--out", str(tmp_path / "junk")],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 2 and "not a quality.csv" in refused.stderr


def test_processes_measure_exactly_what_one_process_does(tmp_path) -> None:
    quality = load_script(SCRIPT)
    args = ["--context", "96", "--block-size", "32", "--budgets", "0.3", "--seeds", "2", "--examples", "1",
            "--questions", "2", "--facts", "6", "--windows", "1", "--bases", "h2o", "random", "--wrappers", "none", "caote",
            "--allocators", "uniform", "adaptive", "--no-controls", "--no-plots", "--no-progress"]
    from kvevict.evaluation.benchmark import run_plan

    plan = quality.plan_from(quality.parse_args(args))
    keys = ("task", "policy", "allocator", "budget_fraction", "seed", "accuracy", "needle_kept", "bits_per_byte")

    def measured(rows) -> list[tuple]:  # nan -> None: nan never equals nan
        return sorted(tuple(None if isinstance(v, float) and math.isnan(v) else v for v in (getattr(r, k) for k in keys))
                      for r in rows)

    rows = run_plan(plan, jobs=1)
    assert {r.model for r in rows} == {"models/retrieval", "models/demo-py"}  # the same on every machine
    assert {r.facts for r in rows if r.task == "retrieval"} == {6} and {r.facts for r in rows if r.task == "text"} == {0}
    one = measured(rows)
    two = measured(run_plan(plan, jobs=2))
    assert one == two


@pytest.mark.parametrize("flags, message", [
    (["--budgets", "0"], "budget fractions"),
    (["--seeds", "0"], "--seeds"),
    (["--bases", "nope"], "unknown base policy"),
    (["--facts", "200"], "--facts 200"),  # more facts than the retrieval model has keys
    (["--facts", "3", "--questions", "4"], "--facts 3"),
])
def test_bad_options_are_refused_with_a_message(flags, message) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-progress", *flags], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2 and message in done.stderr
