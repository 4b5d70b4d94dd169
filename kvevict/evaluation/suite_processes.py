"""The suite grid's processes: kvevict's shards, kvpress in its own environment, transformers'
full cache; each appends to its own CSV (so each resumes on its own), one progress bar counts
the rows of all of them."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kvevict.evaluation.suite_grid import KVPRESS, kvevict_jobs

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "suite.py"
RULER_SUITE = ROOT / "benchmarks" / "ruler_suite.py"
KVPRESS_RUN = ROOT / "benchmarks" / "peers" / "kvpress" / "run.py"


@dataclass
class GridProcess:
    name: str  # its CSV is <out>/<name>.csv, its log <out>/logs/<name>.log
    commands: list[list[str]]  # run one after the other
    csv: Path
    rows: int  # rows it writes when done (progress)
    returncode: int | None = None


def load_model_tokenizer(model: str):
    """The tokenizer of a checkpoint directory or known model name (fetched once)."""
    from transformers import AutoTokenizer

    from kvevict.worker.model_fetch import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def grid_processes(args: argparse.Namespace, prompts: Path, count: int) -> list[GridProcess]:
    from kvevict.worker.model_fetch import resolve_model

    model = resolve_model(args.model)  # kvpress's environment loads directories only
    common = ["--model", model, "--prompts", str(prompts), "--device", args.device]
    threads = ["--threads", "1"] if args.device == "cpu" else []
    per_prompt = len(kvevict_jobs(tuple(args.kept)))
    kept_flags = ["--kept", *(str(k) for k in args.kept)]
    out = []
    # Every kvevict CSV of the directory counts as done, so a rerun with another --jobs resumes too.
    earlier = sorted(str(p) for p in args.out.glob("kvevict-*.csv"))
    done_from = ["--done-from", *earlier] if earlier else []
    for index in range(args.jobs):
        csv = args.out / f"kvevict-{index}.csv"
        rows = len(range(index, per_prompt * count, args.jobs))
        out.append(GridProcess(f"kvevict-{index}", [[sys.executable, str(SUITE), "run", "--grid", "--shard",
                                                    f"{index}/{args.jobs}", "--out", str(csv), "--no-progress",
                                                    *kept_flags, *common, *threads, *done_from]], csv, rows))
    csv = args.out / "transformers.csv"
    out.append(GridProcess("transformers", [[sys.executable, str(RULER_SUITE), "full-cache", *common, "--out",
                                             str(csv), *threads]], csv, count))
    python = args.kvpress_venv / "bin" / "python"
    if python.exists():
        csv = args.out / "kvpress.csv"
        kept = ",".join(str(k) for k in args.kept)
        # The first half of the prompts (the grid's first round: every seed and task) in both
        # protocols first, so that a run cut short compares like with like.
        first = str(count // 2) if count >= 2 else None
        commands = [[str(python), str(KVPRESS_RUN), *common, "--protocol", protocol, "--methods", ",".join(methods),
                     "--kept", kept, "--out", str(csv), *threads, *limit]
                    for limit in ([["--limit", first]] if first else []) + [[]]
                    for protocol, methods in KVPRESS.items()]
        rows = sum((1 + len(methods) * len(args.kept)) * count for methods in KVPRESS.values())
        out.append(GridProcess("kvpress", commands, csv, rows))
    else:
        print(f"grid: no kvpress environment at {args.kvpress_venv} (benchmarks/peers/kvpress/setup.sh builds "
              "it): kvpress's rows are skipped", file=sys.stderr)
    return out


def _data_rows(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as handle:
        return max(0, sum(1 for _ in handle) - 1)


def run_processes(processes: list[GridProcess], logs: Path, disable: bool = False,
                  poll_seconds: float = 2.0) -> list[GridProcess]:
    """Runs every process's commands (the processes side by side), counting CSV rows for the
    progress bar; returns the processes that failed."""
    logs.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, int]] = {}
    handles = {p.name: open(logs / f"{p.name}.log", "a", encoding="utf-8") for p in processes}

    def start(process: GridProcess, step: int) -> None:
        running[process.name] = (subprocess.Popen(process.commands[step], stdout=handles[process.name],
                                                  stderr=subprocess.STDOUT), step)

    total = sum(p.rows for p in processes)
    try:
        with tqdm(total=total, desc="grid", unit="row", disable=disable) as bar:
            for process in processes:
                start(process, 0)
            while running:
                time.sleep(poll_seconds)
                for process in processes:
                    if process.name not in running:
                        continue
                    popen, step = running[process.name]
                    code = popen.poll()
                    if code is None:
                        continue
                    del running[process.name]
                    if code == 0 and step + 1 < len(process.commands):
                        start(process, step + 1)
                    else:
                        process.returncode = code
                bar.update(sum(min(_data_rows(p.csv), p.rows) for p in processes) - bar.n)
    finally:
        for popen, _ in running.values():
            popen.terminate()
        for handle in handles.values():
            handle.close()
    return [p for p in processes if p.returncode != 0]
