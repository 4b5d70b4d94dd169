"""The real-model suite: every method at every kept fraction and protocol on a prompt file,
through the worker's code path, and the tables side by side with kvpress.

    # the whole grid (kvevict.evaluation.suite_grid): prompts, kvevict in 2 processes, kvpress
    # (if benchmarks/peers/kvpress/setup.sh built its environment) and transformers' full cache
    # side by side, one progress bar; then OUT/suite.md and OUT/suite_*.png. Resumable.
    .venv/bin/python benchmarks/suite.py grid --out benchmarks/results/suite      # --full, --device cuda

    # or step by step: the prompts, kvevict's rows, kvpress's rows, the tables
    .venv/bin/python benchmarks/ruler_suite.py generate --model smollm2-135m-instruct --out suite.jsonl
    .venv/bin/python benchmarks/suite.py run --model smollm2-135m-instruct --prompts suite.jsonl \\
        --out results.csv                                   # --grid --shard 0/2: half the grid's plan
    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run.py --model DIR \\
        --prompts suite.jsonl --out kvpress.csv
    .venv/bin/python benchmarks/suite.py table results.csv --from-csv kvpress.csv --out suite.md --plots .

A run appends to its CSV and skips what it holds (resumable); `--methods` takes the policy
spelling (`snapkv`, `caote+snapkv`), `--allocators` adds allocators beyond uniform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kvevict.cache_manager.head_budgets import HEAD_ALLOCATORS
from kvevict.cli_options import STATISTICS_DTYPES
from kvevict.evaluation.ruler import make_records
from kvevict.evaluation.ruler_records import read_prompts, write_prompts
from kvevict.evaluation.suite_grid import (BASES, FULL, HEADLINE, KEPT, RECONSTRUCT_CHUNK, Job, floor_of, kvevict_jobs,
                                          shard)
from kvevict.evaluation.suite_jobs import configured_jobs, pending, per_record, run_jobs
from kvevict.evaluation.suite_plots import plot_suite
from kvevict.evaluation.suite_processes import grid_processes, load_model_tokenizer, run_processes
from kvevict.evaluation.suite_report import done_keys, read_rows
from kvevict.evaluation.suite_runner import PROTOCOLS
from kvevict.evaluation.suite_tables import averaged_rows, suite_markdown
from kvevict.policy_names import format_policy, parse_policy
from kvevict.worker.model_loader import load_model

DEFAULT_METHODS = tuple(format_policy(b, w) for b in BASES for w in ("none", "caote", "fastcaote"))


def planned_jobs(args: argparse.Namespace, prompts: list[dict]) -> list[tuple[Job, dict]]:
    """(job, prompt) pairs, prompt by prompt (a run cut short holds every method of its prompts)."""
    if args.grid:
        per_prompt = kvevict_jobs(tuple(args.kept))
    else:
        per_prompt = configured_jobs(args.methods, args.allocators, args.protocols, args.kept, args.sink,
                                     full_cache=not args.skip_full_cache, lookahead=args.lookahead,
                                     reconstruct=args.reconstruct, reconstruct_pool=args.reconstruct_pool,
                                     profile=args.head_profile.read_bytes() if args.head_profile else b"",
                                     floor=args.floor, recent=args.recent, statistics_dtype=args.statistics_dtype)
    return shard(per_record(per_prompt, prompts), *args.shard)


def run(args: argparse.Namespace) -> int:
    prompts = [r for r in read_prompts(args.prompts) if r["metric"] != "bpb"][: args.limit]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    done = set().union(*(done_keys(path) for path in [args.out, *args.done_from]))
    run_jobs(model, tokenizer, pending(planned_jobs(args, prompts), done), args.out, args.block_size,
             progress=not args.no_progress)
    return 0


def grid(args: argparse.Namespace) -> int:
    """Prompts, kvevict's shards, kvpress and transformers' full cache as parallel processes, one
    progress bar over all of them, then the tables and plots."""
    args.out.mkdir(parents=True, exist_ok=True)
    prompts_path = args.prompts or args.out / "prompts.jsonl"
    if not prompts_path.exists():
        plan = FULL if args.full else HEADLINE
        tokenizer = load_model_tokenizer(args.model)
        write_prompts(make_records(tokenizer, plan.tasks, plan.lengths, plan.n, plan.seeds, in_rounds=True),
                      prompts_path)
    prompts = [r for r in read_prompts(prompts_path) if r["metric"] != "bpb"]
    processes = grid_processes(args, prompts_path, len(prompts))
    failed = run_processes(processes, args.out / "logs", disable=args.no_progress)
    # This grid's CSVs only (a results directory may hold others, e.g. full_cache.csv).
    csvs = sorted({*args.out.glob("kvevict-*.csv"), *(p.csv for p in processes)})
    csvs = [p for p in csvs if p.exists() and p.stat().st_size]
    if csvs:
        table(argparse.Namespace(csv=csvs, from_csv=[], out=args.out / "suite.md", min_full_cache=args.min_full_cache,
                                 plots=args.out, quiet=True))
        print(f"grid: tables -> {args.out / 'suite.md'}; plots -> {args.out}/suite_*.png")
    for process in failed:
        print(f"grid: error: {process.name} exited non-zero; its log: {args.out / 'logs' / process.name}.log",
              file=sys.stderr)
    return 1 if failed else 0


def table(args: argparse.Namespace) -> int:
    rows = [row for path in [*args.csv, *args.from_csv] for row in read_rows(path)]
    if not getattr(args, "all_prompts", False):
        rows, note = averaged_rows(rows)
        if note:
            print(f"table: {note} (--all-prompts: every row)", file=sys.stderr)
    text = suite_markdown(rows, args.min_full_cache)
    if args.out:
        args.out.write_text(text)
    if args.plots:
        for path in plot_suite(rows, args.plots, args.min_full_cache):
            print(f"plot -> {path}", file=sys.stderr)
    if not getattr(args, "quiet", False):
        print(text)
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"write I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="measure kvevict's methods on a prompt file")
    runner.add_argument("--model", required=True, help="checkpoint directory, hub id or known name")
    runner.add_argument("--prompts", type=Path, required=True)
    runner.add_argument("--out", type=Path, required=True, help="results CSV (appended, resumable)")
    runner.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    runner.add_argument("--allocators", nargs="+", default=["uniform"])
    runner.add_argument("--head-profile", type=Path, default=None, metavar="FILE",
                        help="the head profile (`kvevict profile`) the lukv and epicache allocators read")
    runner.add_argument("--floor", type=float, default=None, metavar="F",
                        help="the per-head allocators' floor: each head keeps at least round(F x the budget) "
                             "(0 as KVzip's one top-k; rows named '<method> (<allocator>) (floor F)')")
    runner.add_argument("--kept", type=float, nargs="+", default=list(KEPT))
    runner.add_argument("--protocols", nargs="+", default=["question_agnostic"], choices=PROTOCOLS)
    runner.add_argument("--block-size", type=int, default=128)
    runner.add_argument("--limit", type=int, default=None, help="first N prompts only")
    runner.add_argument("--skip-full-cache", action="store_true",
                        help="no full-cache rows (another CSV of the same prompts has them)")
    runner.add_argument("--sink", type=int, default=None,
                        help="protect this many first tokens in every method (rows named '<method> (sink N)')")
    runner.add_argument("--recent", type=int, default=None,
                        help="protect this many last tokens in every method, in place of each policy's default "
                             "(SnapKV: its window; rows named '<method> (recent N)')")
    runner.add_argument("--lookahead", type=int, default=0,
                        help="decode this many pseudo tokens before each prefill decision and observe with their "
                             "queries (rows named '<method> (lookahead N)')")
    runner.add_argument("--reconstruct", type=int, nargs="?", const=RECONSTRUCT_CHUNK, default=0, metavar="CHUNK",
                        help="before each prefill decision, forward KVzip's repeat prompt and the last CHUNK "
                             f"context tokens (default {RECONSTRUCT_CHUNK}: all of them here) on the cache and observe "
                             "with their queries (rows named '<method> (reconstruct)')")
    runner.add_argument("--reconstruct-pool", default="max", choices=("max", "sum"),
                        help="how the reconstruction's queries pool into attention scores: max as KVzip, or sum "
                             "as a window ('(reconstruct sum)' rows)")
    runner.add_argument("--grid", action="store_true",
                        help="the grid's plan (kvevict.evaluation.suite_grid) instead of --methods/--protocols")
    runner.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                        help="run only the I-th of N round-robin parts of the jobs (N processes, one CSV each)")
    runner.add_argument("--done-from", type=Path, nargs="+", default=[], metavar="CSV",
                        help="skip the rows these results CSVs hold too (other shards, earlier runs)")
    runner.add_argument("--device", default="cpu")
    runner.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    runner.add_argument("--statistics-dtype", default="auto", choices=tuple(STATISTICS_DTYPES),
                        help="the statistics' wire dtype (auto: the manager's choice; rows named "
                             "'<method> (<dtype> statistics)' otherwise)")
    runner.add_argument("--threads", type=int, default=1)
    runner.add_argument("--no-progress", action="store_true")
    tables = commands.add_parser("table", help="markdown tables of results CSVs (kvevict's and peers')")
    tables.add_argument("csv", type=Path, nargs="*")
    tables.add_argument("--from-csv", type=Path, nargs="+", default=[], metavar="CSV",
                        help="more results CSVs to merge (the same as listing them)")
    tables.add_argument("--out", type=Path)
    tables.add_argument("--plots", type=Path, help="also write the plots (PNG) into this directory")
    tables.add_argument("--all-prompts", action="store_true",
                        help="average every row, not only the prompts every configuration answered")
    tables.add_argument("--min-full-cache", type=float, default=0.5,
                        help="tasks the full cache scores below this stay out of the averages")
    grids = commands.add_parser("grid", help="the whole grid, both systems, in parallel processes")
    grids.add_argument("--model", default="smollm2-135m-instruct", help="checkpoint directory or known name")
    grids.add_argument("--out", type=Path, required=True, help="directory: prompts, CSVs, logs, tables, plots")
    grids.add_argument("--full", action="store_true", help="4 prompts per task, seed and length at 1k, 2k and 4k")
    grids.add_argument("--prompts", type=Path, help="a prompt file to run instead of the plan's (written to "
                       "OUT/prompts.jsonl when absent)")
    grids.add_argument("--kept", type=float, nargs="+", default=list(KEPT), help="kept fractions")
    grids.add_argument("--jobs", type=int, default=2, help="kvevict processes (one torch thread each on CPU)")
    grids.add_argument("--device", default="cpu", help="cpu or cuda (every process)")
    grids.add_argument("--kvpress-venv", type=Path, default=Path(__file__).parent / "peers" / "kvpress" / ".venv",
                       help="kvpress's environment (benchmarks/peers/kvpress/setup.sh); skipped when absent")
    grids.add_argument("--min-full-cache", type=float, default=0.5,
                       help="tasks the full cache scores below this stay out of the averages")
    grids.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "table" and not args.csv and not args.from_csv:
        parser.error("table: give at least one results CSV")
    if args.command == "grid" and args.jobs < 1:
        parser.error(f"--jobs: at least 1, got {args.jobs}")
    if args.command == "run":
        for method in args.methods:
            parse_policy(method, "--methods")  # a bad spelling fails before the model loads
        if args.reconstruct < 0:
            parser.error(f"--reconstruct: a number of context tokens >= 1, got {args.reconstruct}")
        if args.floor is not None and not 0 <= args.floor <= 1:
            parser.error(f"--floor: a fraction in [0, 1], got {args.floor}")
        if args.floor is not None and all(floor_of(a, args.floor) is None for a in args.allocators):
            parser.error(f"--floor: only the allocators {', '.join(HEAD_ALLOCATORS)} have a floor; give one "
                         "with --allocators")
        if args.recent is not None and args.recent < 0:
            parser.error(f"--recent: a number of tokens >= 0, got {args.recent}")
        if args.sink is not None and args.sink < 0:
            parser.error(f"--sink: a number of tokens >= 0, got {args.sink}")
        if any(not 0 < k <= 1 for k in args.kept):
            parser.error(f"--kept: fractions must lie in (0, 1], got {args.kept}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return {"run": run, "table": table, "grid": grid}[args.command](args)
    except ValueError as error:
        print(f"suite: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
