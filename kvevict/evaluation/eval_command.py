"""`kvevict eval --model M --data file.jsonl`: eviction measured on a researcher's own records
(kvevict.evaluation.own_data) through the real-model suite's code: the same jobs, rows, resume,
tables and plots as `benchmarks/suite.py run` and `table` (kvevict.evaluation.suite_jobs,
suite_tables, suite_plots).

OUT/results.csv gets one row per (policy, allocator, protocol, kept fraction, record) and the
full cache's per record, appended as measured; a rerun measures only what it lacks.
OUT/settings.json holds the model, dtype and block size the rows were measured with, so that
rows of another model are never mixed in.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kvevict.cli_options import DTYPES

if TYPE_CHECKING:
    from kvevict.evaluation.suite_grid import Job

DEFAULT_POLICIES = "caote+keydiff,keydiff,snapkv,tova"
DEFAULT_KEPT = (0.2, 0.5)


class _LazyChoices:
    """A module's names as argparse choices, imported when argparse first looks at them:
    suite_runner imports torch, which `kvevict --help` and the other commands do without."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __iter__(self) -> Iterator[str]:
        return iter(getattr(importlib.import_module(self.module), self.name))

    def __contains__(self, item: object) -> bool:
        return item in tuple(self)


PROTOCOL_CHOICES = _LazyChoices("kvevict.evaluation.suite_runner", "PROTOCOLS")
ALLOCATOR_CHOICES = _LazyChoices("kvevict.cache_manager.budgets", "ALLOCATORS")


def add_commands(subparsers) -> None:
    """Registers `eval`."""
    parser = subparsers.add_parser(
        "eval", help="measure eviction policies on your own JSONL records (the real-model suite's code)",
        description="Answers every record of --data with the full cache and with each policy at each kept "
                    "fraction of its context, scores the answers by substring match (`all` or `any` of the "
                    "record's answers), then writes the suite's tables and plots. Records: one JSON object a "
                    'line with "context", "question" and "answers" (optional "id", "task", "metric", '
                    '"max_new_tokens", "length"). Resumable: a rerun measures only what OUT/results.csv lacks.')
    parser.add_argument("--model", required=True,
                        help="checkpoint directory, hub id or known model name (`kvevict models list`)")
    parser.add_argument("--data", type=Path, required=True, help="JSONL records (see kvevict/evaluation/own_data.py)")
    parser.add_argument("--out", type=Path, default=Path("eval-results"),
                        help="directory: results.csv (appended, resumable), tables.md, plots; one model per "
                             "directory (default: %(default)s)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="comma-separated policies, base or wrapper+base (default: %(default)s)")
    # A metavar of their own: argparse would otherwise list the choices (import them) at once.
    parser.add_argument("--allocators", nargs="+", default=["uniform"], choices=ALLOCATOR_CHOICES, metavar="ALLOCATOR",
                        help="per-layer budget allocators: %(choices)s; adaptive runs the CAOTE-family policies "
                             "only (default: uniform)")
    parser.add_argument("--kept", type=float, nargs="+", default=list(DEFAULT_KEPT),
                        help="fractions of each context kept, in (0, 1) (default: 0.2 0.5)")
    parser.add_argument("--protocols", nargs="+", default=["question_agnostic"], choices=PROTOCOL_CHOICES,
                        metavar="PROTOCOL", help="how the context is evicted before the question: %(choices)s "
                                                 "(kvevict/evaluation/suite_runner.py; default: question_agnostic)")
    parser.add_argument("--block-size", type=int, default=128, help="prefill block (default: %(default)s)")
    # const: suite_grid.RECONSTRUCT_CHUNK (not imported here: it loads torch before --help).
    parser.add_argument("--reconstruct", type=int, nargs="?", const=2048, default=0, metavar="CHUNK",
                        help="before each prefill decision, forward KVzip's repeat prompt and the last CHUNK (default "
                             "2048) context tokens on the cache and observe with their queries (window policies; "
                             "rows named '<policy> (reconstruct)')")
    parser.add_argument("--reconstruct-pool", default="max", choices=("max", "sum"),
                        help="how the reconstruction's queries pool into attention scores (default: %(default)s, "
                             "KVzip's)")
    parser.add_argument("--skip-full-cache", action="store_true",
                        help="no full-cache rows (the tables then have no tasks to average)")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="greedy tokens per answer, for records without their own (default: %(default)s)")
    parser.add_argument("--min-full-cache", type=float, default=0.0,
                        help="tasks the full cache scores below this stay out of the averages (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="any torch device (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights' dtype (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on <= 2 cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Measures what OUT/results.csv lacks, then writes and prints the tables and plots."""
    import torch

    from kvevict.evaluation.own_data import fill_lengths, read_records
    from kvevict.evaluation.suite_jobs import pending, per_record, run_jobs
    from kvevict.evaluation.suite_plots import plot_suite
    from kvevict.evaluation.suite_report import done_keys, is_full_cache, read_rows
    from kvevict.evaluation.suite_tables import averaged_rows, suite_markdown
    from kvevict.worker.model_loader import default_threads, load_model

    _check_numbers(args)
    jobs = planned(args)  # a misspelt policy fails before the model loads
    records = read_records(args.data, args.max_new_tokens)[: args.limit]
    results = args.out / "results.csv"
    torch.set_num_threads(args.threads or default_threads())
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    _claim(args, results)
    records = fill_lengths(records, tokenizer)
    _check_same_records(results, records)
    pairs = per_record(jobs, records)
    todo = pending(pairs, done_keys(results))
    print(f"eval: {len(records)} records x {len(jobs)} configurations: {len(todo)} answers to measure, "
          f"{len(pairs) - len(todo)} already in {results}", file=sys.stderr)
    run_jobs(model, tokenizer, todo, results, args.block_size, progress=not args.no_progress, desc="eval")
    rows, note = averaged_rows(read_rows(results))
    if note:
        print(f"eval: {note}", file=sys.stderr)
    if not any(is_full_cache(r) for r in rows):
        print(f"eval: {results} has no full-cache rows, and the tables average only the tasks the full cache "
              "answered: rerun without --skip-full-cache", file=sys.stderr)
    text = suite_markdown(rows, args.min_full_cache, title=f"Evaluation of {args.model} on {args.data.name}")
    tables = args.out / "tables.md"
    tables.write_text(text, encoding="utf-8")
    plots = plot_suite(rows, args.out, args.min_full_cache)
    print(text)
    print("\n".join([f"results -> {results}", f"tables -> {tables}", *(f"plot -> {p}" for p in plots)]))
    return 0


def planned(args: argparse.Namespace) -> list[Job]:
    """One record's jobs (kvevict.evaluation.suite_grid.Job): the full cache unless skipped, then
    every policy under every allocator that can run it, protocol and kept fraction."""
    from kvevict.cache_manager.budgets import ALLOCATORS
    from kvevict.evaluation.suite_jobs import configured_jobs
    from kvevict.policy_names import format_policy, parse_policies

    policies = list(dict.fromkeys(parse_policies(args.policies)))  # a repeat would measure twice
    protocols, kept = list(dict.fromkeys(args.protocols)), list(dict.fromkeys(args.kept))
    jobs = configured_jobs([], [], [], [], full_cache=not args.skip_full_cache)  # the full cache's alone
    for allocator in dict.fromkeys(args.allocators):
        wrappers = ALLOCATORS[allocator].wrappers  # None: any; adaptive ranks CAOTE-family scores only
        runnable = [format_policy(b, w) for b, w in policies if wrappers is None or w in wrappers]
        skipped = [format_policy(b, w) for b, w in policies if not (wrappers is None or w in wrappers)]
        if skipped:
            print(f"eval: --allocators {allocator} needs wrapper {' or '.join(wrappers)}: not run for "
                  f"{', '.join(skipped)}", file=sys.stderr)
        jobs += configured_jobs(runnable, [allocator], protocols, kept, full_cache=False,
                                reconstruct=getattr(args, "reconstruct", 0),
                                reconstruct_pool=getattr(args, "reconstruct_pool", "max"))
    if not jobs:
        raise ValueError("nothing to measure: no policy runs under --allocators "
                         f"{' '.join(args.allocators)}, and --skip-full-cache drops the full cache")
    return jobs


def _check_numbers(args: argparse.Namespace) -> None:
    if any(not 0 < k < 1 for k in args.kept):
        raise ValueError(f"--kept: fractions of the context in (0, 1), got {args.kept} (1 is the full cache's row)")
    if getattr(args, "reconstruct", 0) < 0:
        raise ValueError(f"--reconstruct: a number of context tokens >= 1, got {args.reconstruct}")
    for flag, value in (("--block-size", args.block_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--limit", args.limit), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: at least 1, got {value}")
    if not 0 <= args.min_full_cache <= 1:
        raise ValueError(f"--min-full-cache: a score in [0, 1], got {args.min_full_cache}")


def _claim(args: argparse.Namespace, results: Path) -> None:
    """Writes OUT/settings.json, or checks that the results there were measured with this run's
    model, dtype and block size: others' rows must not be skipped as done nor averaged with these."""
    settings = {"model": args.model, "dtype": args.dtype, "block_size": args.block_size}
    path = args.out / "settings.json"
    if path.exists() and results.exists() and results.stat().st_size:
        try:
            held = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{path}: not the JSON this command writes ({error}); give another --out") from None
        if held != settings:
            given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in held.items())
            raise ValueError(f"{args.out} holds results of {given} ({path}); give another --out, or those "
                             "settings to resume")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def _check_same_records(results: Path, records: list[dict]) -> None:
    """Refuses a results CSV whose rows of these ids have another task or length: another data
    file's rows (ids default to line numbers), which a rerun would skip as done."""
    from kvevict.evaluation.suite_report import read_rows

    if not results.exists():
        return
    by_id = {r["id"]: r for r in records}
    for row in read_rows(results):
        record = by_id.get(row.id)
        if record is not None and (row.task, row.length) != (record["task"], record["length"]):
            raise ValueError(f"{results}: id {row.id!r} was measured on task {row.task!r}, length {row.length}; "
                             f"the record of {record['id']!r} is task {record['task']!r}, length {record['length']}: "
                             "rows of another data file? Give another --out")
