"""benchmarks/perf.py --quick runs every section and prints tables (no timing is asserted: the
figures are read from the tables, not judged; only what must hold whatever the machine is)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rows(text: str, title: str) -> list[list[str]]:
    section = text.split(f"## {title}")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("perf") / "perf.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf.py"), "--quick", "--out", str(out)], check=True,
                   cwd=ROOT, timeout=900, capture_output=True)
    return out.read_text()


def test_every_section_has_its_table(quick):
    for title in ("ReportBlock decision in process", "The split: embedded manager vs gRPC + Redis",
                  "Statistics capture per prefill block", "KV memory against the context",
                  "Decode speed at a long context", "End to end against model.generate"):
        rows = _rows(quick, title)
        assert rows and all(any(c.replace(".", "", 1).isdigit() for c in row) for row in rows), title
    assert "load average" in quick


def test_memory_stays_flat_within_the_budget_and_a_block(quick):
    rows = _rows(quick, "KV memory against the context")
    assert len(rows) >= 2 and len({row[1] for row in rows}) == 1  # the same peak KV at every context
    assert all(float(row[2]) <= 1.1 for row in rows)  # peak KV / the budget's bytes (block 32 of 512)


def test_split_runs_both_report_modes(quick):
    modes = [row[1] for row in _rows(quick, "The split: embedded manager vs gRPC + Redis")]
    assert modes == ["sync", "pipelined"]
