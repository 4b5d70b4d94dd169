"""`make demo` stays true: the demo script runs offline on the shipped checkpoint and evicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_offline_and_evicts_with_a_prompt_longer_than_the_budget():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--max-new-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    out = run.stdout
    assert "######## full cache" in out and "######## CAOTE + H2O, budget 96" in out
    summaries = re.findall(r"tokens: (\d+) prompt \+ (\d+) generated", out)
    assert len(summaries) == 2
    prompt_tokens = int(summaries[0][0])
    assert prompt_tokens > 3 * 96  # several times the budget, so eviction really happens
    evicting = out.split("######## CAOTE + H2O")[1]
    evicted = [int(n) for n in re.findall(r"^\s+\d+\s+96\s+(\d+)\s+\d+\s+\d+$", evicting, flags=re.M)]
    assert evicted and all(n > 0 for n in evicted)
