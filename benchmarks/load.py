"""Load on the services: many sessions at once against the cache manager on Redis (one replica,
then two sharing the Redis), and many Generate calls at once against a worker's queue.

(a) one `kvevict manager serve` on one redis-server, (b) two replicas on one redis-server
(session i on replica i % 2, as a worker's channel sticks to one), and with `--cluster` the same
two on a local Redis Cluster (three masters, a replica each; tests/redis_cluster.py): `--sessions`
sessions each send real-sized ReportBlock requests in sequence for `--seconds` (the statistics
of every cached token of every layer, in the negotiated dtypes, for `--shape`: SmolLM2-135M's
30 layers x 3 KV heads by default, `--shape 8b` for Llama-3.1-8B's 32 x 8). Printed: reports/s,
latency p50/p99 (wall time of one call), CPU seconds of every process over the run, errors by
status code (target: none), and the Redis bytes each session holds (`MEMORY USAGE` of its keys,
found by SCAN with the store's prefix).

(c) `--generate-calls` Generate calls started at once against `kvevict worker serve` (the
shipped demo model, its manager on Redis), for each `--max-queue`: the queue depth over time
(scraped from the worker's /metrics), latency p50/p99 of whole calls and of the first token,
and how many were refused RESOURCE_EXHAUSTED (with a queue shorter than the calls).

    .venv/bin/python benchmarks/load.py                       # 64 sessions, 20 s per setup
    .venv/bin/python benchmarks/load.py --shape 8b --seconds 30 --cluster
    .venv/bin/python benchmarks/load.py --quick                # seconds (its test runs it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.servers: the process helpers

import grpc  # noqa: E402

from benchmarks.perf_timing import load_line, markdown, percentile  # noqa: E402
from benchmarks.service_load import CpuMeter, LayerBytes, ReportSession, geometry, median, session_key_bytes  # noqa: E402
from kvevict.grpc_options import channel_options  # noqa: E402
from kvevict.policy_names import parse_policies  # noqa: E402
from kvevict.v1 import cache_manager_pb2 as pb  # noqa: E402
from kvevict.v1 import worker_pb2  # noqa: E402
from tests.servers import RedisServer, ServerProcess, start_managers  # noqa: E402

MANAGER = "/kvevict.v1.CacheManagerService"
PREFIX = "kvevict:"  # the Redis store's default key prefix
CALL_TIMEOUT_S = 60.0
RESTART_CODES = {"ABORTED", "NOT_FOUND", "FAILED_PRECONDITION"}  # the session is gone: open another
WORKER_READY = re.compile(r"event=worker\.ready .*\bport=(\d+)")
MODEL = ROOT / "models" / "demo-py"


@dataclass
class LoadSettings:
    sessions: int
    seconds: float
    shape: str
    policy: str
    budget: int
    block: int
    prefill: int

    def open_request(self) -> pb.OpenSessionRequest:
        ((base, wrapper),) = parse_policies(self.policy)
        return pb.OpenSessionRequest(geometry=geometry(self.shape), policy=pb.PolicySpec(base=base, wrapper=wrapper),
                                     budget=pb.BudgetSpec(tokens=self.budget), block_size=self.block)


@dataclass
class LoadResult:
    setup: str
    sessions: int
    wall_s: float
    latencies_s: list[float]
    errors: Counter
    cpu: dict[str, float]  # process name -> CPU seconds over the run
    client_cpu_s: float
    report_bytes: int
    session_bytes: list[int] = field(default_factory=list)
    index_bytes: int = 0
    keys_left: int = 0

    @property
    def reports(self) -> int:
        return len(self.latencies_s)

    def cpu_total(self, prefix: str) -> float:
        return sum(seconds for name, seconds in self.cpu.items() if name.startswith(prefix))


# -- (a), (b): sessions against manager replicas -------------------------------------------------


class SessionsLoad:
    """`settings.sessions` sessions spread over the manager replicas at `addresses` (session i on
    replica i % replicas), each sending its reports one after another."""

    def __init__(self, addresses: list[str], settings: LoadSettings) -> None:
        self.settings = settings
        self.request = settings.open_request()
        self.channels = [grpc.aio.insecure_channel(a, options=channel_options()) for a in addresses]
        self.opens = [c.unary_unary(f"{MANAGER}/OpenSession", request_serializer=pb.OpenSessionRequest.SerializeToString,
                                    response_deserializer=pb.OpenSessionResponse.FromString) for c in self.channels]
        self.reports = [c.unary_unary(f"{MANAGER}/ReportBlock", request_serializer=None,
                                      response_deserializer=pb.ReportBlockResponse.FromString) for c in self.channels]
        self.closes = [c.unary_unary(f"{MANAGER}/CloseSession", request_serializer=pb.CloseSessionRequest.SerializeToString,
                                     response_deserializer=pb.CloseSessionResponse.FromString) for c in self.channels]
        self.sessions: list[ReportSession] = []
        self.layers: LayerBytes | None = None

    def _session(self, opened: pb.OpenSessionResponse) -> ReportSession:
        return ReportSession(opened.session_id, self.layers, self.request.geometry.num_layers, self.settings.block,
                             self.settings.prefill)

    async def open(self) -> None:
        """Opens every session and encodes every layer's statistics before any clock starts."""
        first = await self.opens[0](self.request, timeout=CALL_TIMEOUT_S)
        self.layers = LayerBytes(first, self.request.geometry.num_kv_heads)
        rest = await asyncio.gather(*(self.opens[i % len(self.opens)](self.request, timeout=CALL_TIMEOUT_S)
                                      for i in range(1, self.settings.sessions)))
        self.sessions = [self._session(o) for o in (first, *rest)]
        block, budget = self.settings.block, self.settings.budget
        for layer in range(self.request.geometry.num_layers):
            for length in range(block, budget + 2 * block, block):
                self.layers.get(layer, length)

    async def run(self, meter: CpuMeter) -> LoadResult:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        errors: Counter = Counter()
        largest = [0]
        deadline = loop.time() + self.settings.seconds

        async def one(i: int) -> None:
            replica = i % len(self.channels)
            while loop.time() < deadline:
                data = self.sessions[i].next_report()
                started = time.perf_counter()
                try:
                    response = await self.reports[replica](data, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1
                    if error.code().name in RESTART_CODES:
                        self.sessions[i] = self._session(await self.opens[replica](self.request, timeout=CALL_TIMEOUT_S))
                    else:  # overloaded or unreachable: the same report again, a moment later
                        await asyncio.sleep(0.05)
                    continue
                latencies.append(time.perf_counter() - started)
                largest[0] = max(largest[0], len(data))
                self.sessions[i].answered(response)

        cpu = time.process_time()
        meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(self.sessions))))
        wall = time.perf_counter() - started
        meter.stop()
        return LoadResult("", len(self.sessions), wall, latencies, errors, dict(meter.used),
                          time.process_time() - cpu, largest[0])

    async def close(self) -> None:
        await asyncio.gather(*(self.closes[i % len(self.closes)](pb.CloseSessionRequest(session_id=s.session_id),
                                                                 timeout=CALL_TIMEOUT_S)
                               for i, s in enumerate(self.sessions)))
        for chan in self.channels:
            await chan.close()


def manager_load(setup: str, addresses: list[str], pids: dict[str, int], redis_clients: list,
                 settings: LoadSettings) -> LoadResult:
    """Runs the sessions, measures the Redis bytes of the open sessions, closes them and counts
    the sessions that left keys behind (none expected)."""
    async def main() -> LoadResult:
        load = SessionsLoad(addresses, settings)
        await load.open()
        result = await load.run(CpuMeter(pids))
        ids = [s.session_id for s in load.sessions]
        per_session, result.index_bytes = session_key_bytes(redis_clients, PREFIX, ids)
        result.session_bytes = list(per_session.values())
        await load.close()
        left, _ = session_key_bytes(redis_clients, PREFIX, ids)
        result.keys_left = sum(1 for size in left.values() if size)
        return result

    result = asyncio.run(main())
    result.setup = setup
    return result


def load_table(results: list[LoadResult]) -> str:
    rows = []
    for r in results:
        managers, redis = r.cpu_total("manager"), r.cpu_total("redis")
        errors = ", ".join(f"{code} {n}" for code, n in sorted(r.errors.items())) or "0"
        rows.append([r.setup, r.sessions, r.reports, r.reports / r.wall_s, percentile(r.latencies_s, 50) * 1e3,
                     percentile(r.latencies_s, 99) * 1e3, errors, f"{r.wall_s:.1f}", f"{managers:.1f}", f"{redis:.1f}",
                     f"{r.client_cpu_s:.1f}", (managers + redis) / max(1, r.reports) * 1e3, r.report_bytes / 1024,
                     median(r.session_bytes) / 1024, max(r.session_bytes, default=0) / 1024, r.keys_left])
    return markdown(["setup", "sessions", "reports", "reports/s", "p50 ms", "p99 ms", "errors", "wall s",
                     "manager CPU s", "redis CPU s", "client CPU s", "server CPU ms / report", "report KiB",
                     "Redis KiB / session (median)", "(max)", "sessions with keys left after close"], rows)


@contextlib.contextmanager
def single_redis(directory: Path) -> Iterator[tuple[str, list, dict[str, int]]]:
    with RedisServer(directory / "redis") as redis:
        client = redis.client()
        try:
            yield redis.url, [client], {"redis": redis.process.pid}
        finally:
            client.close()


@contextlib.contextmanager
def cluster_redis() -> Iterator[tuple[str, list, dict[str, int]]]:
    from tests.redis_cluster import local_cluster

    with local_cluster() as cluster:
        masters = cluster.masters()
        clients = [node.client() for node in masters]
        try:
            yield cluster.url, clients, {f"redis[{node.port}]": node.process.pid for node in cluster.nodes}
        finally:
            for client in clients:
                client.close()


def run_setups(settings: LoadSettings, cluster: bool) -> list[LoadResult]:
    results = []
    stores = [("one Redis", single_redis)] + ([("Redis Cluster (3 masters + 3 replicas)", lambda d: cluster_redis())]
                                              if cluster else [])
    for store_name, store in stores:
        with tempfile.TemporaryDirectory(prefix="kvevict-load-") as directory, store(Path(directory)) as (url, clients, pids):
            for replicas in (1, 2):
                managers = start_managers(replicas, url, "--max-sessions", "0")
                try:
                    addresses = [m.address for m in managers]
                    procs = {**pids, **{f"manager[{i}]": m.process.pid for i, m in enumerate(managers)}}
                    setup = f"{replicas} manager{'s' if replicas > 1 else ''}, {store_name}"
                    results.append(manager_load(setup, addresses, procs, clients, settings))
                    print(f"load: {setup}: {results[-1].reports} reports", file=sys.stderr, flush=True)
                finally:
                    for manager in managers:
                        manager.kill()
    return results


# -- (c): a worker's queue under concurrent Generate calls -----------------------------------------


@dataclass
class QueueResult:
    max_queue: int
    calls: int
    codes: Counter
    latencies_s: list[float]
    first_token_s: list[float]
    depths: list[tuple[float, float]]  # (seconds since the calls started, queue depth)
    wall_s: float
    worker_cpu_s: float
    manager_cpu_s: float
    tokens: int = 0


def _queue_depth(metrics_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
            text = page.read().decode()
    except OSError:
        return None
    found = re.search(r"^kvevict_worker_queue_depth (\S+)$", text, flags=re.M)
    return float(found.group(1)) if found else None


async def _generate_all(address: str, metrics_port: int, calls: int, request: worker_pb2.GenerateRequest,
                        meter: CpuMeter) -> QueueResult:
    chan = grpc.aio.insecure_channel(address, options=channel_options())
    generate = chan.unary_stream("/kvevict.v1.WorkerService/Generate",
                                 request_serializer=worker_pb2.GenerateRequest.SerializeToString,
                                 response_deserializer=worker_pb2.GenerateResponse.FromString)
    codes: Counter = Counter()
    latencies, first_tokens, depths = [], [], []
    tokens = [0]
    done = asyncio.Event()

    async def one() -> None:
        started = time.perf_counter()
        first = None
        try:
            async for message in generate(request, timeout=600):
                if first is None and message.token_ids:
                    first = time.perf_counter() - started
                tokens[0] += len(message.token_ids)
            codes["OK"] += 1
            latencies.append(time.perf_counter() - started)
            if first is not None:
                first_tokens.append(first)
        except grpc.aio.AioRpcError as error:
            codes[error.code().name] += 1

    async def sample() -> None:
        while not done.is_set():
            depth = await asyncio.to_thread(_queue_depth, metrics_port)
            if depth is not None:
                depths.append((time.perf_counter() - started, depth))
            await asyncio.sleep(0.05)

    meter.start()
    started = time.perf_counter()
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(one() for _ in range(calls)))
    wall = time.perf_counter() - started
    done.set()
    await sampler
    meter.stop()
    await chan.close()
    return QueueResult(0, calls, codes, latencies, first_tokens, depths, wall, meter.total("worker"),
                       meter.total("manager"), tokens[0])


def worker_queues(max_queues: list[int], calls: int, max_new_tokens: int, prompt_chars: int) -> list[QueueResult]:
    prompt = (ROOT / "examples" / "demo_prompt.py").read_text()[:prompt_chars]
    request = worker_pb2.GenerateRequest(
        text=prompt, max_new_tokens=max_new_tokens,
        eviction=worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="h2o", wrapper="caote", sink_tokens=4),
                                            budget=pb.BudgetSpec(tokens=64), block_size=16))
    results = []
    with tempfile.TemporaryDirectory(prefix="kvevict-queue-") as directory, RedisServer(Path(directory) / "redis") as redis:
        (manager,) = start_managers(1, redis.url)
        try:
            for max_queue in max_queues:
                worker = ServerProcess(
                    [sys.executable, "-m", "kvevict.cli", "worker", "serve", "--port", "0", "--metrics-port", "0",
                     "--model", str(MODEL), "--manager", manager.address, "--no-fail-open", "--threads", "1",
                     "--max-queue", str(max_queue)], WORKER_READY, name="worker")
                try:
                    worker.wait_ready(180)
                    metrics_port = int(re.search(r"\bmetrics_port=(\d+)", worker.match.string).group(1))
                    meter = CpuMeter({"worker": worker.process.pid, "manager": manager.process.pid})
                    result = asyncio.run(_generate_all(f"127.0.0.1:{worker.match.group(1)}", metrics_port, calls,
                                                       request, meter))
                    result.max_queue = max_queue
                    results.append(result)
                    print(f"load: worker --max-queue {max_queue}: {dict(result.codes)}", file=sys.stderr, flush=True)
                finally:
                    worker.kill()
        finally:
            manager.kill()
    return results


def queue_table(results: list[QueueResult]) -> str:
    rows = []
    for r in results:
        others = sum(n for code, n in r.codes.items() if code not in ("OK", "RESOURCE_EXHAUSTED"))
        rows.append([r.max_queue, r.calls, r.codes.get("OK", 0), r.codes.get("RESOURCE_EXHAUSTED", 0), others,
                     int(max((d for _, d in r.depths), default=-1)), percentile(r.latencies_s, 50),
                     percentile(r.latencies_s, 99), percentile(r.first_token_s, 50), percentile(r.first_token_s, 99),
                     r.tokens / r.wall_s, f"{r.wall_s:.1f}", f"{r.worker_cpu_s:.1f}", f"{r.manager_cpu_s:.1f}"])
    return markdown(["--max-queue", "calls", "OK", "RESOURCE_EXHAUSTED", "other errors", "max queue depth",
                     "latency p50 s", "p99 s", "first token p50 s", "p99 s", "tokens/s", "wall s", "worker CPU s",
                     "manager CPU s"], rows)


def depth_table(results: list[QueueResult], buckets: int = 10) -> str:
    """Queue depth over time: the largest depth sampled in each tenth of each run."""
    rows = []
    for r in results:
        span = max(r.wall_s, 1e-9)
        row = [r.max_queue]
        for b in range(buckets):
            inside = [d for t, d in r.depths if b * span / buckets <= t < (b + 1) * span / buckets]
            row.append(f"{max(inside):.0f}" if inside else "-")
        rows.append(row)
    return markdown(["--max-queue", *[f"{(b + 1) * 10}%" for b in range(buckets)]], rows)


# -- the report ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds each setup runs (default 20)")
    parser.add_argument("--shape", choices=("tiny", "small", "8b"), default="small",
                        help="model shape of the reports: small = SmolLM2-135M (30 x 3), 8b = Llama-3.1-8B (32 x 8)")
    parser.add_argument("--policy", default="caote+h2o", help="policy of every session (default caote+h2o)")
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per KV head (default 512)")
    parser.add_argument("--block", type=int, default=128, help="tokens per report (default 128)")
    parser.add_argument("--prefill", type=int, default=1024, help="prompt tokens, reported in blocks (default 1024)")
    parser.add_argument("--cluster", action="store_true", help="also on a local Redis Cluster (tests/redis_cluster.py)")
    parser.add_argument("--generate-calls", type=int, default=64, help="concurrent Generate calls (default 64)")
    parser.add_argument("--max-queue", type=int, nargs="+", default=[64, 16], help="worker queues to try (default 64 16)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per Generate call (default 16)")
    parser.add_argument("--skip", nargs="*", choices=("managers", "worker"), default=[], help="sections to leave out")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, 2 s per setup, short generations (CI)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report (markdown) here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.seconds, args.budget, args.block, args.prefill = "tiny", 2.0, 64, 16, 64
        args.max_new_tokens = 2
    settings = LoadSettings(args.sessions, args.seconds, args.shape, args.policy, args.budget, args.block, args.prefill)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out" in given:  # where the report goes is not how it was measured
        del given[given.index("--out"):given.index("--out") + 2]
    command = "benchmarks/load.py " + " ".join(given)
    parts = [f"## Load: `.venv/bin/python {command.strip()}`", f"{load_line()} at the start."]
    failed = False
    if "managers" not in args.skip:
        results = run_setups(settings, args.cluster)
        shape = geometry(args.shape)
        parts += [f"### Sessions against the cache manager\n\n{args.sessions} sessions, {args.seconds:g} s per setup, "
                  f"{args.policy}, budget {args.budget}, reports of {args.block} tokens after a {args.prefill}-token "
                  f"prompt, shape {args.shape} ({shape.num_layers} layers x {shape.num_kv_heads} KV heads). Latency: "
                  f"wall time of one ReportBlock call; CPU: the processes' user + system seconds over the run.",
                  load_table(results), f"_{load_line()}_"]
        failed |= any(r.errors or r.keys_left or not r.reports for r in results)
    if "worker" not in args.skip:
        queues = worker_queues(args.max_queue, args.generate_calls, args.max_new_tokens, 600)
        parts += [f"### A worker's queue under {args.generate_calls} concurrent Generate calls\n\n"
                  f"The demo model (models/demo-py), caote+h2o, budget 64, {args.max_new_tokens} new tokens per call, "
                  "its manager on Redis. Latency: the whole call, and until the first token arrives.",
                  queue_table(queues), "Queue depth over time (largest sampled in each tenth of the run):",
                  depth_table(queues), f"_{load_line()}_"]
        for q in queues:
            accepted = min(args.generate_calls, q.max_queue + 1)  # the running one and max_queue waiting
            failed |= sum(n for c, n in q.codes.items() if c not in ("OK", "RESOURCE_EXHAUSTED")) > 0
            failed |= q.codes.get("OK", 0) < accepted
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
