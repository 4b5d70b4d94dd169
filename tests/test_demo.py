"""`make demo` stays true: the demo script runs offline on the shipped checkpoints and evicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_offline_and_evicts_with_prompts_longer_than_the_budget():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Part 0's pretrained model is fetched by `make demo`; here a shipped checkpoint stands in.
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--max-new-tokens", "8",
                          "--real-model", str(ROOT / "models" / "demo-py")],
                         capture_output=True, text=True, env=env, timeout=600, check=True)
    out = run.stdout
    real, rest = out.split("######## 1. retrieval")
    # Part 0: a 1024-token needle prompt; the full cache keeps it all, each policy 20% of the context.
    assert re.search(r"prompt: 10\d\d tokens, RULER needle at depth \d+%", real)
    rows = re.findall(r"^  (\S.*?)\s+(right|wrong)\s+(\d+)\s+([\d.]+)  ", real, flags=re.M)
    assert [r[0] for r in rows] == ["full cache", "KeyDiff", "CAOTE + KeyDiff", "SnapKV", "CAOTE + SnapKV", "TOVA",
                                    "CAOTE + TOVA"]
    context = int(rows[0][2])
    assert all(int(kept) == round(0.2 * context) for _, _, kept, _ in rows[1:])
    retrieval, code = rest.split("######## 2. Python code")
    # Retrieval: a 1024-token prompt, budget 128, the full cache answers right, every evicting
    # policy holds at most the budget when it answers.
    prompt_tokens, budget = map(int, re.search(r"prompt: (\d+) tokens .* budget (\d+) tokens", retrieval).groups())
    assert prompt_tokens > 7 * budget
    rows = re.findall(r"^  (\S.*?)\s+(\S+) (right|wrong)\s+(\d+) of (\d+) heads\s+(\d+)$", retrieval, flags=re.M)
    assert [r[0] for r in rows][:3] == ["full cache", "H2O", "CAOTE + H2O"] and len(rows) == 7
    full = rows[0]
    assert full[2] == "right" and full[3] == full[4] and int(full[5]) == prompt_tokens
    for label, _, _, held, heads, cached in rows[1:]:
        assert int(cached) <= budget and int(held) <= int(heads), label
    # Code: the full cache and CAOTE + H2O at budget 96, which evicts in every layer.
    assert "######## full cache" in code and "######## CAOTE + H2O, budget 96" in code
    summaries = re.findall(r"tokens: (\d+) prompt \+ (\d+) generated", code)
    assert len(summaries) == 2
    assert int(summaries[0][0]) > 3 * 96
    evicting = code.split("######## CAOTE + H2O")[1]
    evicted = [int(n) for n in re.findall(r"^\s+\d+\s+96\s+(\d+)\s+\d+\s+\d+$", evicting, flags=re.M)]
    assert evicted and all(n > 0 for n in evicted)
