"""Timing helpers of the performance benchmarks: wall and CPU time of repeated calls, nearest-rank
percentiles, markdown tables. CPU time is this process's (every thread), which contention on a
shared machine inflates far less than wall time."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)  # seconds per call
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    def wall_p(self, q: float) -> float:
        return percentile(self.wall, q)

    def cpu_p(self, q: float) -> float:
        return percentile(self.cpu, q)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]): with few values, p99 is the largest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def time_call(call: Callable[[], object], timing: Timing) -> object:
    """Runs `call` once, adding its wall and CPU seconds to `timing`; returns its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    timing.add(time.perf_counter() - wall, time.process_time() - cpu)
    return result


def repeat(call: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        call()
    timing = Timing()
    for _ in range(repeats):
        time_call(call, timing)
    return timing


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} on {os.cpu_count()} cores"
