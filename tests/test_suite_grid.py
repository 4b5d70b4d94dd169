"""The suite grid: its plan covers every base x wrapper at every kept fraction; shards split the
jobs without loss or overlap; `benchmarks/suite.py grid` runs the processes side by side and its
tables say whether the full cache answers what plain transformers answers."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from kvevict.evaluation.grid import allowed
from kvevict.evaluation.ruler import make_record
from kvevict.evaluation.ruler_records import write_prompts
from kvevict.evaluation.suite_grid import (ALLOCATOR_RUNS, BASES, BEST, KEPT, WRAPPERS, kvevict_jobs, method_config,
                                          method_name, shard)
from kvevict.evaluation.suite_jobs import configured_jobs
from kvevict.evaluation.suite_report import read_rows
from kvevict.policy_names import format_policy
from tests.checkpoints import save_tiny_checkpoint
from tests.script_loader import load_script

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py"


def test_the_plan_runs_every_base_under_every_wrapper_at_every_kept_fraction() -> None:
    jobs = kvevict_jobs()
    assert jobs[0].config is None and sum(j.config is None for j in jobs) == 1  # the full cache once, first
    agnostic = {(j.method, j.kept) for j in jobs if j.protocol == "question_agnostic" and j.config is not None
                and j.config.allocator == "uniform"}
    assert agnostic == {(format_policy(b, w), k) for b in BASES for w in WRAPPERS for k in KEPT}
    others = {(j.config.base, j.config.wrapper, j.config.allocator) for j in jobs
              if j.config is not None and j.config.allocator != "uniform"}
    assert {format_policy(b, w) for b, w, _ in others} == set(BEST)
    assert all(allowed(w, a) for _, w, a in others) and len(others) == len(ALLOCATOR_RUNS)
    assert len({(j.method, j.protocol, j.kept) for j in jobs}) == len(jobs)  # no job twice
    assert method_name("keydiff", "pyramid") == "keydiff (pyramid)"
    assert method_name("keydiff", "uniform", 4) == "keydiff (sink 4)"


def test_a_floor_reaches_the_per_head_allocators_budget_and_names_their_rows() -> None:
    jobs = configured_jobs(["caote+snapkv"], ["uniform", "global"], ["one_shot"], [0.1], full_cache=False, floor=0.0)
    by_allocator = {j.config.allocator: j for j in jobs}
    assert by_allocator["global"].method == "caote+snapkv (global) (floor 0)"
    assert by_allocator["uniform"].method == "caote+snapkv"  # uniform has no floor: neither named nor sent
    spec = by_allocator["global"].config.settings(budget=100, block_size=128).budget
    assert spec.HasField("floor") and spec.floor == 0.0
    assert not by_allocator["uniform"].config.settings(budget=100, block_size=128).budget.HasField("floor")
    default = method_config("caote+snapkv", "global").settings(budget=100, block_size=128).budget
    assert not default.HasField("floor")  # None: the allocator's own default
    assert method_name("keydiff", "lukv", floor=0.05) == "keydiff (lukv) (floor 0.05)"


def test_protected_recent_tokens_reach_the_policy_and_name_the_row() -> None:
    [job] = configured_jobs(["snapkv"], ["uniform"], ["one_shot"], [0.1], full_cache=False, recent=0)
    assert job.method == "snapkv (recent 0)"
    policy = job.config.settings(budget=100, block_size=128).policy
    assert policy.HasField("recent_tokens") and policy.recent_tokens == 0
    [default] = configured_jobs(["snapkv"], ["uniform"], ["one_shot"], [0.1], full_cache=False)
    assert not default.config.settings(budget=100, block_size=128).policy.HasField("recent_tokens")


def test_shards_split_the_jobs_without_loss_or_overlap() -> None:
    items = list(range(23))
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(x for part in parts for x in part) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="--shard"):
        shard(items, 3, 3)


def test_the_grid_runs_both_shards_and_transformers_and_tables_them(tmp_path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", num_hidden_layers=2, hidden_size=64)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompts = tmp_path / "prompts.jsonl"
    write_prompts([make_record("niah_single_number_noise", tokenizer, 2048, 0)], prompts)
    out = tmp_path / "grid"
    suite = load_script(SUITE)
    assert suite.main(["grid", "--model", str(checkpoint), "--out", str(out), "--prompts", str(prompts), "--kept",
                       "0.5", "--kvpress-venv", str(tmp_path / "absent"), "--min-full-cache", "0", "--no-progress"]) == 0
    shards = [read_rows(out / f"kvevict-{i}.csv") for i in range(2)]
    expected = {(j.method, j.protocol, j.kept) for j in kvevict_jobs((0.5,))}
    got = [(r.method, r.protocol, r.kept_fraction) for rows in shards for r in rows]
    assert sorted(got) == sorted(expected) and abs(len(shards[0]) - len(shards[1])) <= 1
    table = (out / "suite.md").read_text()
    assert "kvevict's full cache predicts exactly what transformers predicts on 1 of 1 prompts." in table
    assert (out / "suite_by_base.png").stat().st_size > 0
    # Resumed with another number of processes: nothing runs again.
    assert suite.main(["grid", "--model", str(checkpoint), "--out", str(out), "--prompts", str(prompts), "--kept",
                       "0.5", "--kvpress-venv", str(tmp_path / "absent"), "--jobs", "3", "--no-progress"]) == 0
    assert sum(len(read_rows(path)) for path in out.glob("kvevict-*.csv")) == len(expected)


def test_a_statistics_dtype_reaches_the_worker_and_names_the_row() -> None:
    from kvevict.v1 import tensor_pb2

    [job] = configured_jobs(["kvzip"], ["global"], ["one_shot"], [0.1], full_cache=False, statistics_dtype="float32")
    assert job.method == "kvzip (global) (float32 statistics)"
    assert job.config.settings(budget=100, block_size=128).statistics_dtype == tensor_pb2.DTYPE_FLOAT32
    [default] = configured_jobs(["kvzip"], ["global"], ["one_shot"], [0.1], full_cache=False)
    assert default.config.settings(budget=100, block_size=128).statistics_dtype == tensor_pb2.DTYPE_UNSPECIFIED
