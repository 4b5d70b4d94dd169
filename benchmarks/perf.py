"""kvevict's performance, measured: the manager's decision, the worker/manager split (embedded vs
gRPC + Redis, synchronous vs pipelined reports), statistics capture, KV memory against the
context, decode speed at a long context, and SmolLM2-135M end to end against plain
`model.generate`. Medians and p99 over repetitions, CPU time beside wall time (these machines
are shared), ratios measured side by side in one run, the load average printed.

    .venv/bin/python benchmarks/perf.py                   # every section; writes docs/PERFORMANCE.md
    .venv/bin/python benchmarks/perf.py --quick           # small shapes, seconds (CI runs it)
    .venv/bin/python benchmarks/perf.py --sections split decode --out /tmp/perf.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.perf_timing import load_line  # noqa: E402

# name: (module, function, title, what it shows)
SECTIONS = {
    "decision": ("benchmarks.perf_decision", "decision_table", "ReportBlock decision in process",
                 "One report of every layer decided by the manager (validation, scores, budgets, selection, the "
                 "answer), no transport. Target: p50 <= 3 ms and p99 <= 5 ms of CPU on the Llama-8B shape for "
                 "caote+h2o and caote+snapkv."),
    "split": ("benchmarks.perf_worker", "split_table", "The split: embedded manager vs gRPC + Redis",
              "A whole generation with the manager in process or as a service (state in a private Redis), with "
              "synchronous reports (the worker waits for each decision) and pipelined ones (`--pipelined`: period "
              "n is decided while period n+1 runs, its masks apply one period late, the cache peaks at the budget "
              "plus two blocks). The remote run must give the embedded run's tokens (checked). Target: remote / "
              "embedded <= 1.03."),
    "capture": ("benchmarks.perf_worker", "capture_table", "Statistics capture per prefill block",
                "The cost of measuring each policy's statistics inside attention against the full cache on SDPA. "
                "Window policies (TOVA, SnapKV) compute probabilities only for the queries their window needs, "
                "beside SDPA's output; policies that sum every query's attention (H2O) take one float32 pass."),
    "memory": ("benchmarks.perf_worker", "memory_table", "KV memory against the context",
               "Peak KV bytes and resident memory while prefilling ever longer contexts at one budget: flat (target "
               "<= 1.1 x the budget's bytes; the block adds its 32 tokens)."),
    "decode": ("benchmarks.perf_worker", "decode_table", "Decode speed at a long context",
               "Decode tokens/s at a 16k context, evicting to 1k tokens against the full cache (target >= 3x). The "
               "model has SmolLM2-135M's layers, 4 of them: the per-layer balance of attention and MLP, which sets "
               "the ratio, is the real model's."),
    "end_to_end": ("benchmarks.perf_worker", "end_to_end_table", "End to end against model.generate",
                   "SmolLM2-135M: plain `model.generate` with the full cache, `model.generate` with an "
                   "`EvictingCache`, and the worker's own loop."),
}


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def run(sections: list[str], quick: bool) -> str:
    torch.set_num_threads(1)
    parts = [f"# Performance\n\nMeasured by `benchmarks/perf.py{' --quick' if quick else ''}` on "
             f"{platform.processor() or platform.machine()} ({cpu_name()}, torch's {torch.backends.cpu.get_cpu_capability()} "
             f"kernels), torch {torch.__version__}, one torch thread "
             f"(CPU; no GPU was used); {load_line()} at the start."]
    for name in sections:
        module, function, title, what = SECTIONS[name]
        started = time.perf_counter()
        table = getattr(importlib.import_module(module), function)(quick=quick)
        parts.append(f"## {title}\n\n{what}\n\n{table}\n\n_{time.perf_counter() - started:.0f} s; {load_line()}_")
        print(parts[-1] + "\n", flush=True)
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions (CI)")
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file to write (default: docs/PERFORMANCE.md, not in --quick mode)")
    args = parser.parse_args(argv)
    text = run(args.sections, args.quick)
    out = args.out or (None if args.quick else ROOT / "docs" / "PERFORMANCE.md")
    if out is not None:
        out.write_text(text)
        print(f"perf: tables -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
