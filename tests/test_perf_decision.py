"""benchmarks/perf_decision.py: its quick table (CI's) has a floor row, one row per requested
policy x allocator with CPU and wall p50/p99, the load average and the decision path, and runs
in seconds; --first-report times fresh processes' start-up and first decisions."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf_decision.py"


def load_script(path: Path) -> ModuleType:
    """The script as a module, registered first (its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("perf_decision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("perf_decision", module)
    spec.loader.exec_module(module)
    return module


def test_the_quick_decision_table_has_every_row_and_column() -> None:
    perf = load_script(SCRIPT)
    rows = [("h2o", "caote", "uniform"), ("snapkv", "caote", "adaptive"), ("keydiff", "none", "uniform")]
    started = time.monotonic()
    table = perf.decision_table(quick=True, rows=rows)
    assert time.monotonic() - started < 20
    lines = table.splitlines()
    assert "load average" in lines[0] and "3 layers" in lines[0]
    assert lines[2] == "| policy | allocator | CPU ms p50 | CPU ms p99 | wall ms p50 | wall ms p99 | x floor |"
    assert lines[4].startswith("| floor (read the statistics once) |")
    body = lines[5:]
    assert [line.split(" | ")[:2] for line in body] == [["| caote+h2o", "uniform"], ["| caote+snapkv", "adaptive"],
                                                         ["| keydiff", "uniform"]]
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert all(float(value) > 0 for value in cells[2:]), line


def test_every_row_spells_its_policy_as_policy_names_does() -> None:
    from kvevict.policy_names import format_policy, parse_policy

    perf = load_script(SCRIPT)
    for base, wrapper, _ in perf.ROWS:
        assert parse_policy(format_policy(base, wrapper)) == (base, wrapper)


def test_the_first_report_measure_starts_a_fresh_process_with_the_kernels_loaded() -> None:
    """--first-report: a fresh interpreter imports the manager (the kernels from numba's cache)
    and decides its first reports, each timed; the numpy path's run says it had no kernels."""
    perf = load_script(SCRIPT)
    from kvevict.cache_manager import kernels

    (result,) = perf.first_report(runs=1)
    assert result["kernels"] is kernels.enabled
    assert result["import_s"] > 0 and len(result["reports_ms"]) == 4
    assert all(t > 0 for t in result["reports_ms"])
    (numpy_path,) = perf.first_report(runs=1, environment={"KVEVICT_KERNELS": "0"})
    assert numpy_path["kernels"] is False
