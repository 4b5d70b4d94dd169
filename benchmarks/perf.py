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
import importlib
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.perf_timing import load_line  # noqa: E402

# name: (module, function, title)
SECTIONS = {
    "decision": ("benchmarks.perf_decision", "decision_table", "ReportBlock decision in process"),
    "split": ("benchmarks.perf_worker", "split_table", "The split: embedded manager vs gRPC + Redis"),
    "capture": ("benchmarks.perf_worker", "capture_table", "Statistics capture per prefill block"),
    "memory": ("benchmarks.perf_worker", "memory_table", "KV memory against the context"),
    "decode": ("benchmarks.perf_worker", "decode_table", "Decode speed at a long context"),
    "end_to_end": ("benchmarks.perf_worker", "end_to_end_table", "End to end against model.generate"),
}


def run(sections: list[str], quick: bool) -> str:
    torch.set_num_threads(1)
    parts = [f"# Performance\n\nMeasured by `benchmarks/perf.py{' --quick' if quick else ''}` on "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one torch thread "
             f"(CPU; no GPU was used); {load_line()} at the start."]
    for name in sections:
        module, function, title = SECTIONS[name]
        started = time.perf_counter()
        table = getattr(importlib.import_module(module), function)(quick=quick)
        parts.append(f"## {title}\n\n{table}\n\n_{time.perf_counter() - started:.0f} s; {load_line()}_")
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
