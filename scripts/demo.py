"""`make demo`: the shipped Python-code model continues a prompt several times longer than its
KV budget, once with the full cache and once evicting with CAOTE-wrapped H2O (embedded mode)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvevict.cli import main as kvevict

ROOT = Path(__file__).resolve().parent.parent


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=str(ROOT / "models" / "demo-py"))
    parser.add_argument("--prompt-file", default=str(ROOT / "examples" / "demo_prompt.py"))
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    common = ["generate", "--model", args.model, "--prompt-file", args.prompt_file,
              "--max-new-tokens", str(args.max_new_tokens), "--block-size", "32"]
    runs = [("full cache (budget above the prompt length)", ["--policy", "h2o", "--budget", "100000"]),
            (f"CAOTE + H2O, budget {args.budget} tokens per KV head",
             ["--policy", "h2o", "--wrapper", "caote", "--budget", str(args.budget), "--sink", "4"])]
    prompt_tail = Path(args.prompt_file).read_text().rstrip("\n").splitlines()[-4:]
    print(f"prompt: {os.path.relpath(args.prompt_file)} ({len(Path(args.prompt_file).read_text())} characters), ending with:")
    print("\n".join("    | " + line for line in prompt_tail))
    for title, extra in runs:
        print(f"\n######## {title} ########", flush=True)
        status = kvevict(common + extra)
        if status:
            return status
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
