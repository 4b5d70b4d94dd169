"""Per-head budgets in the worker: decode speed and KV bytes against the rectangular cache at the
same total budget, on SmolLM2-135M-Instruct (fetched once: `kvevict models fetch
smollm2-135m-instruct`).

    .venv/bin/python benchmarks/per_head_worker.py --context 2048 --kept 0.1 0.2 --steps 96

Each configuration prefills the first suite prompt (cut or repeated to --context tokens) block by
block with an embedded manager, then decodes --steps greedy tokens; every decode step is timed
(wall and process CPU time), the steps that end a report period included. The table gives the
median and p99 per step and the ratio of medians to the uniform allocator's with the same policy
(measured in the same run, interleaved by repetition). Bytes: what the cache allocates
(`kv_bytes`, the packed buffers' slack included), what the kept entries take, and their ratio;
for the rectangular cache both are the same tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvevict  # noqa: E402
from benchmarks.perf_worker import SMOLLM, smollm_available, suite_prompt_ids  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.worker.cache_session import CacheSession, EvictionSettings  # noqa: E402
from kvevict.worker.manager_client import EmbeddedManagerClient  # noqa: E402
from kvevict.worker.model_loader import load_model  # noqa: E402

CONFIGS = (("snapkv", "uniform"), ("snapkv", "adahead"), ("caote+snapkv", "uniform"), ("caote+snapkv", "adahead"),
           ("caote+snapkv", "global"))


def run_once(model, prompt: torch.Tensor, policy: str, allocator: str, budget: int, block: int,
             steps: int) -> dict:
    settings = EvictionSettings(policy=kvevict.policy(policy).spec(),
                                budget=pb.BudgetSpec(tokens=budget, allocator=allocator), block_size=block)
    session = CacheSession(model, EmbeddedManagerClient(), settings)
    try:
        logits = session.prefill(prompt)
        walls, cpus = [], []
        for _ in range(steps):
            token = int(torch.argmax(logits))
            wall, cpu = time.perf_counter(), time.process_time()
            logits = session.decode(token)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        counts = session.cache_counts()
    finally:
        session.close()
    return {"wall": walls, "cpu": cpus, "kv_bytes": counts["kv_bytes"], "kept_bytes": counts["kept_kv_bytes"]}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not smollm_available():
        print(f"{SMOLLM} is not fetched: run `kvevict models fetch {SMOLLM}` first", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(SMOLLM)
    prompt = suite_prompt_ids(tokenizer, args.context)
    load = os.getloadavg()
    print(f"SmolLM2-135M-Instruct, float32, {args.threads} torch thread(s), context {args.context}, "
          f"{args.steps} decode steps x {args.repeats} repetitions, block {args.block_size}; "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start\n")
    print("| kept | policy | allocator | decode CPU p50 / p99 ms | decode wall p50 / p99 ms | CPU p50 / uniform "
          "| KV bytes held | kept entries' bytes | held / kept |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fraction in args.kept:
        budget = max(1, round(fraction * args.context))
        results: dict[tuple[str, str], dict] = {}
        for _ in range(args.repeats):  # interleaved: drift hits every configuration alike
            for policy, allocator in CONFIGS:
                got = run_once(model, prompt, policy, allocator, budget, args.block_size, args.steps)
                if (policy, allocator) in results:
                    results[policy, allocator]["wall"] += got["wall"]
                    results[policy, allocator]["cpu"] += got["cpu"]
                else:
                    results[policy, allocator] = got
        for (policy, allocator), got in results.items():
            base = statistics.median(results[policy, "uniform"]["cpu"])
            cpu50, wall50 = statistics.median(got["cpu"]), statistics.median(got["wall"])
            print(f"| {fraction:.0%} ({budget}) | {policy} | {allocator} | {cpu50 * 1e3:.2f} / {p99(got['cpu']) * 1e3:.2f} "
                  f"| {wall50 * 1e3:.2f} / {p99(got['wall']) * 1e3:.2f} | {cpu50 / base:.2f} | {got['kv_bytes']:,} "
                  f"| {got['kept_bytes']:,} | {got['kv_bytes'] / got['kept_bytes']:.3f} |")
    load = os.getloadavg()
    print(f"\n_load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end._")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
