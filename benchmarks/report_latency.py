"""Latency of one ReportBlock through gRPC, with session state in Redis, against the same report
decided in process.

Starts a private redis-server on a free port (never the machine's own Redis) and `kvevict
manager serve` subprocesses on it and on memory://, then times full-cache reports (every layer
evicts one block) from a gRPC client: request serialization, transport, validation, decision,
encode, the compare-and-set write (one round trip: the replica starts from the state it cached
at the previous report), response. "no cache" is a replica started with --state-cache-mb 0,
which reads the version and the whole state from Redis on every report (what a replica that
did not serve the session's previous report does). Prints p50/p90 per transport, shape and
policy, with the request and stored state sizes.

    .venv/bin/python benchmarks/report_latency.py [--repeats 20] [--policies caote+h2o,tova]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers: the process helpers

from kvevict import wire  # noqa: E402
from kvevict.cache_manager import InMemoryStateStore, ManagerCore  # noqa: E402
from kvevict.cache_manager.redis_store import session_key  # noqa: E402
from kvevict.policy_names import format_policy, parse_policies  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.v1 import tensor_pb2  # noqa: E402
from tests.servers import RedisServer, channel, manager_stub, start_manager  # noqa: E402

SHAPES = {  # name: (layers, kv heads, cached tokens, block)
    "small (4 x 2 x (512+32))": (4, 2, 512, 32),
    "Llama-8B (32 x 8 x (4096+128))": (32, 8, 4096, 128),
}


def build(opened: pb.OpenSessionResponse, layers: int, heads: int, sequence: int, first: int, new: int, length: int,
          rng: np.random.Generator) -> pb.ReportBlockRequest:
    request = pb.ReportBlockRequest(session_id=opened.session_id, sequence=sequence, phase=pb.PHASE_PREFILL,
                                    positions=wire.encode(np.arange(first, first + new, dtype=np.int64)))
    for layer in range(layers):
        values = []
        for req in opened.statistics:
            data = rng.random((heads, length), dtype=np.float32)
            values.append(wire.encode((data * 2 - 1 if req.statistic == pb.STATISTIC_KEY_COSINE else data).astype(np.float16)))
        request.layers.add(layer=layer, cache_length=length, values=values)
    return request


def measure(call, state_size, policy: tuple[str, str], shape: tuple[int, int, int, int],
            repeats: int) -> tuple[list[float], int, int]:
    """Times `repeats` full-cache reports through `call(OpenSession|ReportBlock request)`."""
    layers, heads, cached, block = shape
    base, wrapper = policy
    opened = call(pb.OpenSessionRequest(
        geometry=pb.ModelGeometry(num_layers=layers, num_kv_heads=heads, num_query_heads=heads * 4, head_dim=128),
        policy=pb.PolicySpec(base=base, wrapper=wrapper, sink_tokens=4, recent_tokens=32),
        budget=pb.BudgetSpec(tokens=cached), block_size=block, statistics_dtype=tensor_pb2.DTYPE_FLOAT16))
    rng = np.random.default_rng(0)
    call(build(opened, layers, heads, 1, 0, cached, cached, rng))  # fill the cache to the budget
    requests = [build(opened, layers, heads, i + 2, cached + i * block, block, cached + block, rng) for i in range(repeats)]
    timings = []
    for request in requests:
        started = time.perf_counter()
        response = call(request)
        timings.append(time.perf_counter() - started)
        assert len(response.keeps) == layers
    return timings, requests[0].ByteSize(), state_size(opened.session_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--policies", default="caote+h2o,tova", help="comma-separated [wrapper+]base")
    args = parser.parse_args()
    try:
        policies = parse_policies(args.policies)
    except ValueError as error:
        parser.error(str(error))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp)) as redis:
        with redis.client() as client, start_manager(redis.url) as remote, start_manager("memory://") as memory, \
                start_manager(redis.url, "--state-cache-mb", "0") as uncached:
            core = ManagerCore(InMemoryStateStore())
            targets = {"in process": (None, lambda sid: len(core.store.get(sid).to_bytes()))}
            channels = []
            stored = lambda sid: client.strlen(session_key(sid))  # noqa: E731
            for name, manager, size in (("gRPC + memory://", memory, None), ("gRPC + Redis", remote, stored),
                                        ("gRPC + Redis, no cache", uncached, stored)):
                ch = channel(manager.address)
                channels.append(ch)
                targets[name] = (manager_stub(ch), size)
            for shape_name, shape in SHAPES.items():
                for policy in policies:
                    for name, (stub, size) in targets.items():
                        if stub is None:
                            def call(request):
                                return core.open_session(request) if isinstance(request, pb.OpenSessionRequest) else core.report_block(request)
                        else:
                            def call(request, stub=stub):
                                method = stub.OpenSession if isinstance(request, pb.OpenSessionRequest) else stub.ReportBlock
                                return method(request, timeout=60)
                        timings, request_bytes, state_bytes = measure(call, size or (lambda sid: 0), policy, shape, args.repeats)
                        timings.sort()
                        rows.append((shape_name, format_policy(*policy), name, request_bytes, state_bytes,
                                     statistics.median(timings) * 1e3, timings[int(0.9 * (len(timings) - 1))] * 1e3))
            for ch in channels:
                ch.close()
    print(f"ReportBlock latency, full cache (every layer evicts one block), float16 statistics, {args.repeats} reports each")
    print(f"| {'shape':<30} | {'policy':<10} | {'path':<22} | {'request MB':>10} | {'state MB':>8} | {'p50 ms':>7} | {'p90 ms':>7} |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 24}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 9}|")
    for shape_name, policy, name, request_bytes, state_bytes, p50, p90 in rows:
        state = f"{state_bytes / 1e6:>8.2f}" if state_bytes else f"{'-':>8}"
        print(f"| {shape_name:<30} | {policy:<10} | {name:<22} | {request_bytes / 1e6:>10.2f} | {state} | {p50:>7.2f} | {p90:>7.2f} |")


if __name__ == "__main__":
    main()
