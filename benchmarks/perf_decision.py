"""CPU and wall time of one ReportBlock decision in process, per policy x allocator.

The manager alone (`ManagerCore.report_block` over an InMemoryStateStore, no transport), on a
Llama-3.1-8B-shaped report: 32 layers x 8 KV heads, 4096 cached + 128 new tokens per layer,
float16 statistics, so every layer evicts a block. Each session is first filled up to its
budget, then every timed report adds one block (cache lengths follow the session's budgets, so
the adaptive allocator's uneven layers are measured as they really are).

The `floor` row reads the statistics once (a max over every statistic's bytes): what no decision
can go below. The `x floor` column is each policy's CPU p50 over the floor's.

Decisions run in the manager's compiled kernels (kvevict.cache_manager.kernels, numba) unless
`--numpy` (or KVEVICT_KERNELS=0) asks for the numpy path; the caption says which. The kernels
load when the manager is imported (before any timing here); `--first-report` measures, in fresh
processes, that import and the first decisions after it, as a service starting would see them.

    .venv/bin/python benchmarks/perf_decision.py                  # full: 32 layers, 60 reports a row
    .venv/bin/python benchmarks/perf_decision.py --quick          # 3 layers, 6 reports a row (CI)
    .venv/bin/python benchmarks/perf_decision.py --numpy          # the numpy path, for comparison
    .venv/bin/python benchmarks/perf_decision.py --first-report   # start-up and first decisions

Times are CPU time of this process (`time.process_time`) on one numpy thread, and wall time
(`time.perf_counter`); the load average in the caption says how busy the machine was.

Measured here (2 shared cores, AMD EPYC with AVX-512, load average 1-1.7 from another job), CPU
ms p50 / p99 of the kernels against the numpy path of commit 3f74f81, run alternately:
caote+h2o uniform 2.8-3.1 / 4.2-5.3 (was 6.6-6.8 / 14-15), caote+snapkv uniform 2.2-2.7 /
3.3-4 (was 6.2-6.6 / 15), caote+h2o adaptive 3.8-4.3 / 4.6-7 (was 7.6-10.9 / 15-22),
caote+snapkv adaptive 3.2-3.4 / 4-4.8 (was 7.7-8.6 / 13-16). Adaptive budgets stay about 1 ms
above uniform ones: every layer's estimated totals are needed before any layer is selected, a
second pass over the statistics (kernels.totals) and the allocation. A fresh process imports the
manager in ~0.7 s (the kernels from numba's cache; ~20 s the first time on a machine) and decides
its first reports in 4-9 ms, then at the steady rate. This machine's speed drifts by up to 1.5x
within an hour (both paths alike): compare rows measured side by side.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kvevict import wire  # noqa: E402
from kvevict.cache_manager import kernels  # noqa: E402
from kvevict.cache_manager.service import ManagerCore  # noqa: E402
from kvevict.cache_manager.state import InMemoryStateStore  # noqa: E402
from kvevict.policy_names import format_policy  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.v1 import tensor_pb2  # noqa: E402

# (base, wrapper, allocator): every base with and without CAOTE under `uniform`, the CAOTE
# wrappers under `pyramid` and `adaptive` for the policies the targets are set for.
ROWS: list[tuple[str, str, str]] = (
    [(base, wrapper, "uniform") for base in ("h2o", "tova", "tova-mean", "snapkv", "keydiff", "streaming", "random",
                                             "valuenorm") for wrapper in ("none", "caote")]
    + [("snapkv", "fastcaote", "uniform"), ("h2o", "caote", "pyramid"), ("snapkv", "caote", "pyramid"),
       ("h2o", "caote", "adaptive"), ("snapkv", "caote", "adaptive"), ("tova", "caote", "adaptive"),
       ("snapkv", "fastcaote", "adaptive")]
)
TARGET_P50_MS, TARGET_P99_MS = 3.0, 5.0


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    kv_heads: int = 8
    cached: int = 4096
    block: int = 128
    repeats: int = 60


QUICK = Shape(layers=3, repeats=6)


class Reports:
    """Reports for one session: seeded random float16 statistics of the session's current cache
    lengths, cut from one pre-drawn pool (drawing 2 M values per report would dominate the run)."""

    def __init__(self, session: pb.OpenSessionResponse, shape: Shape, seed: int = 0) -> None:
        self.session = session
        self.shape = shape
        rng = np.random.default_rng(seed)
        pool = rng.random(1 << 22, dtype=np.float32)
        self.positive = pool.astype(np.float16)
        self.signed = (pool * 2 - 1).astype(np.float16)  # cosines
        self.rng = rng
        self.sequence = 0
        self.next_position = 0

    def _values(self, statistic: int, size: int) -> bytes:
        pool = self.signed if statistic == pb.STATISTIC_KEY_COSINE else self.positive
        start = int(self.rng.integers(0, pool.size - size))
        return pool[start:start + size].tobytes()

    def next(self, cache_lengths: list[int], new: int) -> pb.ReportBlockRequest:
        heads = self.shape.kv_heads
        layers = []
        for layer, cached in enumerate(cache_lengths):
            length = cached + new
            values = [tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[heads, length],
                                        data=self._values(req.statistic, heads * length))
                      for req in self.session.statistics]
            layers.append(pb.LayerStatistics(layer=layer, cache_length=length, values=values))
        self.sequence += 1
        positions = np.arange(self.next_position, self.next_position + new, dtype=np.int64)
        self.next_position += new
        return pb.ReportBlockRequest(session_id=self.session.session_id, sequence=self.sequence,
                                     phase=pb.PHASE_PREFILL, positions=wire.encode(positions), layers=layers)


def open_session(core: ManagerCore, base: str, wrapper: str, allocator: str, shape: Shape) -> pb.OpenSessionResponse:
    geometry = pb.ModelGeometry(num_layers=shape.layers, num_kv_heads=shape.kv_heads,
                                num_query_heads=shape.kv_heads * 4, head_dim=128)
    return core.open_session(pb.OpenSessionRequest(
        geometry=geometry, policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=4, recent_tokens=32),
        budget=pb.BudgetSpec(tokens=shape.cached, allocator=allocator), block_size=shape.block,
        statistics_dtype=tensor_pb2.DTYPE_FLOAT16))


def measure(base: str, wrapper: str, allocator: str, shape: Shape,
            profile: cProfile.Profile | None = None) -> tuple[list[float], list[float], list[float]]:
    """CPU and wall seconds of `shape.repeats` full-cache reports, and the floor's CPU seconds
    (reading the same reports' statistics once); `profile`, if given, profiles the timed calls."""
    core = ManagerCore(InMemoryStateStore())
    session = open_session(core, base, wrapper, allocator, shape)
    reports = Reports(session, shape)
    # Fill the cache up to the budget (nothing evicted), then one warm-up block.
    core.report_block(reports.next([0] * shape.layers, shape.cached))
    cpu, wall, floor = [], [], []
    for repeat in range(shape.repeats + 1):
        lengths = core.store.get(session.session_id).cache_lengths
        request = reports.next(lengths, shape.block)
        if profile is not None and repeat:
            profile.enable()
        started, started_wall = time.process_time(), time.perf_counter()
        response = core.report_block(request)
        elapsed_wall, elapsed = time.perf_counter() - started_wall, time.process_time() - started
        if profile is not None:
            profile.disable()
        # Uniform and pyramid budgets: every layer evicts; adaptive moves budget between layers.
        assert response.keeps, "the benchmark's reports must evict"
        if repeat:  # the first one warms caches and allocators up
            cpu.append(elapsed)
            wall.append(elapsed_wall)
            floor.append(read_once(request))
    return cpu, wall, floor


def read_once(request: pb.ReportBlockRequest) -> float:
    """CPU seconds to read every statistic of `request` once (the floor of any decision)."""
    started = time.process_time()
    for layer in request.layers:
        for tensor in layer.values:
            np.frombuffer(tensor.data, dtype=np.uint16).max()
    return time.process_time() - started


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(np.ceil(0.99 * len(ordered))) - 1)]


def decision_table(quick: bool = False, rows: list[tuple[str, str, str]] | None = None,
                   shape: Shape | None = None) -> str:
    """A markdown table of decision latency per policy x allocator (CPU and wall ms, p50 and p99).

    `quick`: 3 layers and 6 reports a row (seconds, for CI); else the Llama-3.1-8B shape with 60
    reports a row.
    """
    shape = shape or (QUICK if quick else Shape())
    rows = rows if rows is not None else ROWS
    measured, floors = [], []
    for base, wrapper, allocator in rows:
        cpu, wall, floor = measure(base, wrapper, allocator, shape)
        measured.append((format_policy(base, wrapper), allocator, cpu, wall))
        floors += floor
    floor_p50 = statistics.median(floors)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    path = "compiled kernels (numba)" if kernels.enabled else "numpy path (kernels off)"
    lines = [
        f"ReportBlock decision in process, {shape.layers} layers x {shape.kv_heads} KV heads x ({shape.cached} + "
        f"{shape.block}) tokens, float16 statistics, {shape.repeats} reports a row, {path}; "
        f"target p50 <= {TARGET_P50_MS:g} ms, p99 <= {TARGET_P99_MS:g} ms CPU; load average {load}",
        "",
        "| policy | allocator | CPU ms p50 | CPU ms p99 | wall ms p50 | wall ms p99 | x floor |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| floor (read the statistics once) | | {floor_p50 * 1e3:.2f} | {_p99(floors) * 1e3:.2f} | | | 1.0 |",
    ]
    for name, allocator, cpu, wall in measured:
        p50 = statistics.median(cpu)
        lines.append(f"| {name} | {allocator} | {p50 * 1e3:.2f} | {_p99(cpu) * 1e3:.2f} | "
                     f"{statistics.median(wall) * 1e3:.2f} | {_p99(wall) * 1e3:.2f} | {p50 / floor_p50:.1f} |")
    return "\n".join(lines)


def profile_row(base: str, wrapper: str, allocator: str, shape: Shape, lines: int = 12) -> str:
    """cProfile (CPU timer) of one row's timed reports: the top `lines` functions by own time."""
    profile = cProfile.Profile(time.process_time)
    measure(base, wrapper, allocator, shape, profile)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# Run in a fresh interpreter: the manager's import (kernels loaded from numba's cache, or
# compiled), then a session filled to its budget and its first evicting reports.
_FIRST_REPORT = """
import json, sys, time
started, started_cpu = time.perf_counter(), time.process_time()
sys.path.insert(0, {here!r})
from kvevict.cache_manager import kernels
from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
imported, imported_cpu = time.perf_counter(), time.process_time()
import perf_decision as perf
shape = perf.Shape()
core = ManagerCore(InMemoryStateStore())
session = perf.open_session(core, {base!r}, {wrapper!r}, {allocator!r}, shape)
reports = perf.Reports(session, shape)
times = []
for lengths, new in [([0] * shape.layers, shape.cached)] + [(None, shape.block)] * 3:
    request = reports.next(lengths or core.store.get(session.session_id).cache_lengths, new)
    began = time.process_time()
    core.report_block(request)
    times.append(time.process_time() - began)
print(json.dumps(dict(kernels=kernels.enabled, import_s=imported - started, import_cpu_s=imported_cpu - started_cpu,
                      reports_ms=[t * 1e3 for t in times])))
"""


def first_report(base: str = "h2o", wrapper: str = "caote", allocator: str = "uniform", runs: int = 2,
                 environment: dict[str, str] | None = None) -> list[dict]:
    """Fresh processes' start-up: the manager's import (s, wall and CPU) and CPU ms of the
    first reports (the fill, then three evicting ones), `runs` times."""
    code = _FIRST_REPORT.format(here=str(Path(__file__).resolve().parent), base=base, wrapper=wrapper,
                                allocator=allocator)
    results = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, **(environment or {})})
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def first_report_lines(runs: int = 2) -> str:
    lines = ["", "Start-up of a fresh process (caote+h2o/uniform): importing the manager, then CPU ms of its "
             "first reports (the fill to the budget, then 3 evicting ones)", ""]
    for label, environment in (("kernels (numba's cache)", {}), ("numpy path (KVEVICT_KERNELS=0)",
                                                                 {"KVEVICT_KERNELS": "0"})):
        for result in first_report(runs=runs, environment=environment):
            lines.append(f"- {label}: import {result['import_s']:.2f} s wall ({result['import_cpu_s']:.2f} s CPU); "
                         "reports " + ", ".join(f"{t:.1f}" for t in result["reports_ms"]) + " ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 layers, 6 reports a row (for CI)")
    parser.add_argument("--only", nargs="*", default=None, metavar="POLICY/ALLOCATOR",
                        help="rows to measure, e.g. caote+h2o/adaptive (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="reports timed per row")
    parser.add_argument("--profile", metavar="POLICY/ALLOCATOR", default=None,
                        help="print the cProfile top functions of one row instead of the table")
    parser.add_argument("--numpy", action="store_true", help="the numpy path (the compiled kernels off)")
    parser.add_argument("--first-report", action="store_true",
                        help="also measure fresh processes' start-up and first reports, kernels and numpy")
    args = parser.parse_args(argv)
    if args.numpy:
        kernels.enabled = False
    shape = QUICK if args.quick else Shape()
    if args.repeats:
        shape = Shape(shape.layers, shape.kv_heads, shape.cached, shape.block, args.repeats)
    if args.profile:
        name, allocator = args.profile.split("/")
        base, wrapper = next((b, w) for b, w, _ in ROWS if format_policy(b, w) == name)
        print(profile_row(base, wrapper, allocator, shape))
        return
    rows = ROWS
    if args.only:
        rows = [row for row in ROWS if f"{format_policy(row[0], row[1])}/{row[2]}" in args.only]
    print(decision_table(args.quick, rows, shape))
    if args.first_report:
        print(first_report_lines())


if __name__ == "__main__":
    main()
