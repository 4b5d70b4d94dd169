"""Eviction quality at a budget: every base x wrapper x allocator, through the worker's code path.

Runs each configuration at each budget (a fraction of the context) on each seed's prompts, in
embedded mode (block-wise prefill, statistics inside attention, one ReportBlock per block), and
writes `quality.csv` (a row per task x configuration x budget x seed), `quality.md` (mean and
spread over seeds) and PNG plots of quality against budget into `--out`.

    .venv/bin/python benchmarks/quality.py                       # shipped checkpoints, full grid
    .venv/bin/python benchmarks/quality.py --model meta-llama/Llama-3.1-8B --text-file book.txt \\
        --device cuda --dtype bfloat16 --context 8192 --block-size 128
    .venv/bin/python benchmarks/quality.py --tasks text --bases h2o tova --seeds 3 --jobs 2
    .venv/bin/python benchmarks/quality.py --from-csv a/quality.csv b/quality.csv --out merged

Tasks: `retrieval` (key -> value facts hidden in a haystack, questions at the end: accuracy and
whether the answers survived eviction; a checkpoint's own task, else facts rendered as text in
`--text-file`) and `text` (bits per byte of held-out text and its gap to the full cache).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvevict.evaluation import grid, report
from kvevict.evaluation.benchmark import TASKS, Measurer, Plan, run_plan

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--model", help="one model (hub id or path) for both tasks")
    parser.add_argument("--retrieval-model", default=str(ROOT / "models" / "retrieval"))
    parser.add_argument("--text-model", default=str(ROOT / "models" / "demo-py"))
    parser.add_argument("--text-file", help="text for the windows (default: the text model's held-out files) "
                                            "and the haystack of text-rendered retrieval")
    parser.add_argument("--context", type=int, default=1024, help="context tokens per prompt or window")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--budgets", type=float, nargs="+", default=list(grid.BUDGET_FRACTIONS),
                        help="budgets as fractions of the context")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds 0..N-1")
    parser.add_argument("--examples", type=int, default=16, help="retrieval prompts per seed")
    parser.add_argument("--questions", type=int, default=8, help="questions per retrieval prompt")
    parser.add_argument("--facts", type=int, default=None,
                        help="facts per retrieval prompt, asked ones included (default: the task's density; "
                             "more facts, more distractors)")
    parser.add_argument("--windows", type=int, default=8, help="text windows per seed")
    parser.add_argument("--bases", nargs="+", default=list(grid.BASES))
    parser.add_argument("--wrappers", nargs="+", default=list(grid.WRAPPERS), choices=grid.WRAPPERS)
    parser.add_argument("--allocators", nargs="+", default=list(grid.ALLOCATOR_NAMES), choices=grid.ALLOCATOR_NAMES)
    parser.add_argument("--no-controls", action="store_true", help="skip the recent-window and value-norm controls")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--jobs", type=int, default=1, help="processes (each loads the models once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--from-csv", type=Path, nargs="+", metavar="CSV",
                        help="run nothing: write the tables and plots of these runs' CSVs, merged (e.g. tasks run apart)")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    for fraction in args.budgets:
        grid.budget_tokens(fraction, args.context)  # rejects fractions outside (0, 1]
    configs = grid.configurations(args.bases, args.wrappers, args.allocators, controls=not args.no_controls)
    return Plan(configs=tuple(configs), budgets=tuple(sorted(args.budgets)), seeds=tuple(range(args.seeds)),
                tasks=tuple(args.tasks), retrieval_model=args.model or args.retrieval_model,
                text_model=args.model or args.text_model, text_file=args.text_file, context_tokens=args.context,
                block_size=args.block_size, examples=args.examples, questions=args.questions, facts=args.facts,
                windows=args.windows, device=args.device, dtype=args.dtype)


def write_outputs(rows: list[report.Row], out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "quality.csv", out / "quality.md"]
    report.write_csv(rows, written[0])
    tasks = list(dict.fromkeys(r.task for r in rows))
    sections = []
    for task in tasks:
        sections.append(f"## {task}\n\n" + report.markdown_table(rows, task))
        if task == report.RETRIEVAL:
            sections.append("### needle kept (retrieval)\n\n" + report.markdown_table(rows, task, metric="needle_kept"))
        for wrapper in ("caote", "fastcaote"):
            if any(r.task == task and r.wrapper == wrapper for r in rows):
                better = "positive: more questions answered" if task == report.RETRIEVAL else \
                    "positive: a larger gap, i.e. worse"
                sections.append(f"### {wrapper} minus no wrapper ({task}, paired by seed)\n\n{better}; `*`: the mean "
                                "exceeds twice its standard error\n\n" + report.markdown_effects(rows, task, wrapper))
        if any(r.task == task and r.wrapper in ("caote", "fastcaote") for r in rows):
            sections.append(f"### allocators ({task})\n\n" + report.markdown_allocators(rows, task))
        if plots:
            written.append(report.plot_by_base(rows, task, out / f"{task}_by_base.png"))
            if any(r.task == task and r.wrapper == "caote" for r in rows):
                written.append(report.plot_allocators(rows, task, out / f"{task}_allocators.png"))
    written[1].write_text("# Eviction quality\n\n" + "\n\n".join(sections) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_csv:
        return render(args.from_csv, args.out, plots=not args.no_plots)
    try:
        plan = plan_from(args)
    except ValueError as error:
        print(f"quality: error: {error}", file=sys.stderr)
        return 2
    if plan.facts is not None and "retrieval" in plan.tasks:
        try:  # one prompt now, rather than an error inside every worker process later
            Measurer(plan).retrieval_task().example(np.random.default_rng(0), plan.context_tokens, plan.questions,
                                                    facts=plan.facts)
        except ValueError as error:
            print(f"quality: error: --facts {plan.facts}: {error}", file=sys.stderr)
            return 2
    total = len(plan.runs())
    started = time.perf_counter()
    with tqdm(total=total, unit="run", desc="quality", file=sys.stderr, disable=args.no_progress) as bar:
        def progress(row: report.Row) -> None:
            bar.set_postfix_str(f"{row.task} {row.policy} {row.budget_fraction:.0%} seed {row.seed}", refresh=False)
            bar.update()

        rows = run_plan(plan, jobs=args.jobs, threads=args.threads, on_row=progress)
    written = write_outputs(rows, args.out, plots=not args.no_plots)
    print((args.out / "quality.md").read_text())
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


def render(paths: list[Path], out: Path, plots: bool) -> int:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"quality: error: --from-csv: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = []
    for path in paths:
        try:
            rows += report.read_csv(path)
        except ValueError as error:  # a missing or unknown column, a value of the wrong type
            print(f"quality: error: --from-csv {path}: not a quality.csv ({error})", file=sys.stderr)
            return 2
    # Tables average a task's rows over seeds: they must all come from one setup.
    for task in dict.fromkeys(r.task for r in rows):
        setups = {(r.model, r.context_tokens, r.block_size, r.facts) for r in rows if r.task == task}
        if len(setups) > 1:
            listed = "; ".join(f"model {m}, context {c}, block {b}, facts {f}" for m, c, b, f in sorted(setups))
            print(f"quality: error: --from-csv: {task} rows come from different setups ({listed})", file=sys.stderr)
            return 2
    keys = [(r.task, r.policy, r.allocator, r.budget_fraction, r.seed) for r in rows]
    if len(set(keys)) != len(keys):
        print("quality: error: --from-csv: the files measure the same run twice", file=sys.stderr)
        return 2
    written = write_outputs(rows, out, plots=plots)
    print((out / "quality.md").read_text())
    print(f"{len(rows)} runs from {len(paths)} files; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
