"""The real-model suite: every method at every kept fraction and protocol on a prompt file,
through the worker's code path, and the tables side by side with kvpress.

    # the prompts (benchmarks/ruler_suite.py writes them from a seed), then kvevict's rows
    .venv/bin/python benchmarks/ruler_suite.py generate --model smollm2-135m-instruct --out suite.jsonl
    .venv/bin/python benchmarks/suite.py run --model smollm2-135m-instruct --prompts suite.jsonl \\
        --out benchmarks/results/suite/results.csv
    # kvpress's rows on the same prompts and kept fractions, in its own environment
    benchmarks/peers/kvpress/setup.sh
    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run.py --model DIR \\
        --prompts suite.jsonl --out benchmarks/results/suite/kvpress.csv
    # one table per protocol, both systems
    .venv/bin/python benchmarks/suite.py table benchmarks/results/suite/*.csv --out benchmarks/results/suite/suite.md

A run appends to its CSV and skips what it holds (resumable); `--methods` takes the policy
spelling (`snapkv`, `caote+snapkv`), `--allocators` adds allocators beyond uniform.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kvevict.evaluation.ruler_records import read_prompts
from kvevict.evaluation.runner import EvictionConfig
from kvevict.evaluation.suite_metric import score
from kvevict.evaluation.suite_report import (FULL_CACHE, SuiteRow, append_rows, done_keys, is_full_cache,
                                             markdown_full_cache, markdown_paired_effects, markdown_side_by_side,
                                             read_rows)
from kvevict.evaluation.suite_runner import PROTOCOLS, answer_prompt
from kvevict.policy_names import format_policy, parse_policy
from kvevict.worker.model_loader import load_model

BASES = ("h2o", "tova", "snapkv", "keydiff", "streaming", "random")
DEFAULT_METHODS = tuple(format_policy(b, w) for b in BASES for w in ("none", "caote", "fastcaote"))
KEPT = (0.1, 0.2, 0.35, 0.5)


def method_config(method: str, allocator: str) -> EvictionConfig:
    base, wrapper = parse_policy(method, "--methods")
    return EvictionConfig(base=base, wrapper=wrapper, allocator=allocator)


def method_name(method: str, allocator: str) -> str:
    return method if allocator == "uniform" else f"{method} ({allocator})"


def run(args: argparse.Namespace) -> int:
    prompts = [r for r in read_prompts(args.prompts) if r["metric"] != "bpb"][: args.limit]
    configs = [(method_name(m, a), method_config(m, a)) for m in args.methods for a in args.allocators]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    done = done_keys(args.out)
    jobs = [] if args.skip_full_cache else [(FULL_CACHE, None, "question_agnostic", 1.0, r) for r in prompts]
    jobs += [(name, config, protocol, kept, r) for name, config in configs for protocol in args.protocols
             for kept in args.kept for r in prompts]
    jobs = [j for j in jobs if ("kvevict", j[0], j[2], j[3], j[4]["id"]) not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, config, protocol, kept, record in tqdm(jobs, desc="suite", disable=args.no_progress):
        answer = answer_prompt(model, tokenizer, record, config, kept, protocol, args.block_size)
        append_rows([SuiteRow("kvevict", name, protocol, kept, record["id"], record["task"], record["length"],
                              score(answer.prediction, record["answers"], record["metric"]), answer.prediction,
                              answer.seconds)], args.out)
    return 0


def table(args: argparse.Namespace) -> int:
    rows = [row for path in args.csv for row in read_rows(path)]
    protocols = [p for p in PROTOCOLS if any(r.protocol == p and not is_full_cache(r) for r in rows)]
    sections = ["## Full cache per task\n\n" + markdown_full_cache(rows, args.min_full_cache)]
    for protocol in protocols:
        sections.append(f"## {protocol}\n\nscore (%), mean ± standard error over the prompts of the tasks the full "
                        f"cache answers >= {args.min_full_cache:.0%}\n\n"
                        + markdown_side_by_side(rows, protocol, args.min_full_cache))
        effects = markdown_paired_effects(rows, protocol, args.min_full_cache)
        if effects.count("\n") > 1:
            sections.append(f"### wrapper minus base ({protocol}, kvevict, paired by prompt)\n\npoints; `*`: "
                            "beyond twice the standard error\n\n" + effects)
    text = "# Real-model suite\n\n" + "\n\n".join(sections) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="measure kvevict's methods on a prompt file")
    runner.add_argument("--model", required=True, help="checkpoint directory, hub id or known name")
    runner.add_argument("--prompts", type=Path, required=True)
    runner.add_argument("--out", type=Path, required=True, help="results CSV (appended, resumable)")
    runner.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    runner.add_argument("--allocators", nargs="+", default=["uniform"])
    runner.add_argument("--kept", type=float, nargs="+", default=list(KEPT))
    runner.add_argument("--protocols", nargs="+", default=["question_agnostic"], choices=PROTOCOLS)
    runner.add_argument("--block-size", type=int, default=128)
    runner.add_argument("--limit", type=int, default=None, help="first N prompts only")
    runner.add_argument("--skip-full-cache", action="store_true",
                        help="no full-cache rows (another CSV of the same prompts has them)")
    runner.add_argument("--device", default="cpu")
    runner.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    runner.add_argument("--threads", type=int, default=1)
    runner.add_argument("--no-progress", action="store_true")
    tables = commands.add_parser("table", help="markdown tables of results CSVs (kvevict's and peers')")
    tables.add_argument("csv", type=Path, nargs="+")
    tables.add_argument("--out", type=Path)
    tables.add_argument("--min-full-cache", type=float, default=0.5,
                        help="tasks the full cache scores below this stay out of the averages")
    args = parser.parse_args(argv)
    if args.command == "run":
        for method in args.methods:
            parse_policy(method, "--methods")  # a bad spelling fails before the model loads
        if any(not 0 < k <= 1 for k in args.kept):
            parser.error(f"--kept: fractions must lie in (0, 1], got {args.kept}")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return run(args) if args.command == "run" else table(args)
    except ValueError as error:
        print(f"suite: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
