"""Decision latency of one ReportBlock in process (the manager alone, no transport).

A Llama-3.1-8B-shaped report by default: 32 layers x 8 KV heads, 4096 cached + 128 new tokens,
float16 statistics, so every layer evicts a block. Prints a table of p50/p90 per policy.

    .venv/bin/python benchmarks/decision_latency.py [--layers 32 --kv-heads 8 --cached 4096 --block 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from kvevict import wire
from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
from kvevict.policy_names import format_policy
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

POLICIES = [("h2o", "none"), ("h2o", "caote"), ("tova", "caote"), ("snapkv", "caote"), ("snapkv", "fastcaote"),
            ("keydiff", "none"), ("streaming", "none")]


def _report(session: pb.OpenSessionResponse, geometry: pb.ModelGeometry, sequence: int, first: int, new: int,
            length: int, rng: np.random.Generator) -> pb.ReportBlockRequest:
    layers = []
    for layer in range(geometry.num_layers):
        values = []
        for req in session.statistics:
            data = rng.random((geometry.num_kv_heads, length), dtype=np.float32)
            if req.statistic == pb.STATISTIC_KEY_COSINE:
                data = data * 2 - 1
            values.append(wire.encode(data.astype(np.float16)))
        layers.append(pb.LayerStatistics(layer=layer, cache_length=length, values=values))
    return pb.ReportBlockRequest(session_id=session.session_id, sequence=sequence, phase=pb.PHASE_PREFILL,
                                 positions=wire.encode(np.arange(first, first + new, dtype=np.int64)), layers=layers)


def measure(base: str, wrapper: str, args: argparse.Namespace) -> list[float]:
    geometry = pb.ModelGeometry(num_layers=args.layers, num_kv_heads=args.kv_heads,
                                num_query_heads=args.kv_heads * 4, head_dim=128)
    core = ManagerCore(InMemoryStateStore())
    session = core.open_session(pb.OpenSessionRequest(
        geometry=geometry, policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=4, recent_tokens=32),
        budget=pb.BudgetSpec(tokens=args.cached), block_size=args.block,
        statistics_dtype=tensor_pb2.DTYPE_FLOAT16))
    rng = np.random.default_rng(0)
    # Fill the cache up to the budget first (nothing evicted), then time full-cache reports.
    core.report_block(_report(session, geometry, 1, 0, args.cached, args.cached, rng))
    timings = []
    for i in range(args.repeats):
        request = _report(session, geometry, i + 2, args.cached + i * args.block, args.block,
                          args.cached + args.block, rng)
        started = time.perf_counter()
        response = core.report_block(request)
        timings.append(time.perf_counter() - started)
        assert len(response.keeps) == args.layers
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--cached", type=int, default=4096)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"ReportBlock decision, {args.layers} layers x {args.kv_heads} KV heads x "
          f"({args.cached} + {args.block}) tokens, float16 statistics, {args.repeats} reports each")
    print(f"| {'policy':<18} | {'p50 ms':>7} | {'p90 ms':>7} |")
    print(f"|{'-' * 20}|{'-' * 9}|{'-' * 9}|")
    for base, wrapper in POLICIES:
        timings = sorted(measure(base, wrapper, args))
        p50 = statistics.median(timings) * 1e3
        p90 = timings[int(0.9 * (len(timings) - 1))] * 1e3
        print(f"| {format_policy(base, wrapper):<18} | {p50:>7.2f} | {p90:>7.2f} |")


if __name__ == "__main__":
    main()
