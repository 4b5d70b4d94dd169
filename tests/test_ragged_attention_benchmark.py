"""benchmarks/ragged_attention.py --quick prints a row for the rectangular cache and every layout
in every shape and budget pattern it runs (timings are read from the table, not judged; only what
holds whatever the machine: the rows, the rectangular cache's bytes, the padded layouts' bytes
under uneven budgets, and a verdict line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvevict.worker.ragged_kv import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_table_has_every_layout_row():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ragged_attention.py"), "--quick"], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]
    seen = {(r["shape"], r["budgets"], r["layout"]) for r in rows}
    for shape in ("Llama-3.1-8B", "SmolLM2-135M"):
        for pattern in ("even", "one"):
            for layout in ("rectangular", "rectangular-rows", *LAYOUTS):
                assert (shape, pattern, layout) in seen, (shape, pattern, layout)
    assert len(rows) == len(seen) == 2 * 2 * (2 + len(LAYOUTS))
    for r in rows:
        bytes_ratio = float(r["bytes / kept (max)"])
        assert bytes_ratio >= 1.0 and float(r["decode / rect"]) > 0 and r["meets both"] in ("yes", "no", "-")
        if r["layout"].startswith("rectangular"):
            assert bytes_ratio == 1.0 and r["meets both"] == "-"
        if r["layout"] == "rectangular":
            assert r["decode / rect"] == "1.00"
        if r["budgets"] == "one" and r["layout"].startswith("padded"):
            # 7 heads padded to the one head of 6.6x (Llama), 2 to the one of 2.6x (SmolLM).
            assert bytes_ratio > 2.5 and r["meets both"] == "no"
    assert "Layouts meeting decode <= 1.20 x rectangular" in run.stdout and "load average" in run.stdout
