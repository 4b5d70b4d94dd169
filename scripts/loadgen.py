"""Load generator: sends Generate requests to a kvevict worker, one after another, so that the
dashboards have something to show (docker-compose.yml runs it under the `loadgen` profile).

    python scripts/loadgen.py --worker 127.0.0.1:50052                  # until stopped
    python scripts/loadgen.py --worker 127.0.0.1:50052 --requests 4 --interval 0

Each request takes a slice of this very file as its prompt (Python source, what the demo model
knows; random length between --min-chars and --max-chars), and the next policy of --policies in
turn (`[wrapper+]base`, e.g. `caote+h2o`), with sampling seeded by the request number. --concurrency senders keep
that many requests in flight (the worker runs one at a time, the others wait in its queue). It
waits for the worker's health to be SERVING first. One logfmt line per request; a failed request
is logged and the loop goes on (the worker may be restarting). Exit status: 0 when every request
succeeded, 1 otherwise.
Needs what the manager image holds (grpcio, grpcio-health-checking, numpy, kvevict; no torch).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvevict import logs
from kvevict.grpc_options import channel_options
from kvevict.logs import log_event
from kvevict.policy_names import format_policy, parse_policies
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("kvevict.loadgen")
DEFAULT_POLICIES = "caote+h2o,caote+tova,fastcaote+snapkv,caote+keydiff"
SOURCE = Path(__file__).read_text()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Send Generate requests to a kvevict worker in a loop.")
    parser.add_argument("--worker", default=os.environ.get("KVEVICT_WORKER", "127.0.0.1:50052"),
                        help="host:port of the worker [KVEVICT_WORKER, default 127.0.0.1:50052]")
    parser.add_argument("--requests", type=int, default=0, help="requests to send; 0 = until stopped")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between the end of a request and the next one of the same sender")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight at once (the worker serves one at a time: the rest queue)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help="comma-separated [wrapper+]base, used in turn (default: %(default)s)")
    parser.add_argument("--budget", type=int, default=64, help="tokens kept per KV head per layer")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per prefill block / decode report")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--min-chars", type=int, default=300, help="shortest prompt, characters")
    parser.add_argument("--max-chars", type=int, default=1500, help="longest prompt, characters")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt choice and sampling")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of one request, seconds")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the worker to be SERVING")
    args = parser.parse_args(argv)
    try:
        args.policy_specs = [pb.PolicySpec(base=base, wrapper=wrapper)
                             for base, wrapper in parse_policies(args.policies)]
    except ValueError as error:
        parser.error(str(error))
    if not 0 < args.min_chars <= args.max_chars:
        parser.error("need 0 < --min-chars <= --max-chars")
    if args.concurrency < 1 or args.requests < 0:
        parser.error("need --concurrency >= 1 and --requests >= 0")
    return args


def wait_serving(channel: grpc.Channel, timeout_s: float) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not SERVING after {timeout_s:g} s")
        time.sleep(1.0)


def request(args: argparse.Namespace, number: int, rng: random.Random) -> worker_pb2.GenerateRequest:
    """Request `number`: a slice of SOURCE, the next policy in turn, sampling seeded by the number."""
    length = rng.randint(args.min_chars, min(args.max_chars, len(SOURCE)))
    start = rng.randint(0, len(SOURCE) - length)
    return worker_pb2.GenerateRequest(
        text=SOURCE[start:start + length], max_new_tokens=args.max_new_tokens,
        eviction=worker_pb2.EvictionOptions(policy=args.policy_specs[number % len(args.policy_specs)],
                                            budget=pb.BudgetSpec(tokens=args.budget), block_size=args.block_size),
        sampling=worker_pb2.SamplingOptions(temperature=args.temperature, seed=args.seed + number))


def send(stub: worker_pb2_grpc.WorkerServiceStub, args: argparse.Namespace, number: int) -> bool:
    """Sends request `number` (its prompt and seed depend only on --seed and the number); True if OK."""
    message = request(args, number, random.Random(args.seed * 1_000_003 + number))
    policy = message.eviction.policy
    fields = {"n": number, "policy": format_policy(policy.base, policy.wrapper), "prompt_chars": len(message.text)}
    started = time.monotonic()
    try:
        summary = None
        for response in stub.Generate(message, timeout=args.timeout):
            if response.HasField("summary"):
                summary = response.summary
    except grpc.RpcError as error:
        log_event(log, logging.WARNING, "loadgen.request", **fields, status=error.code().name,
                  seconds=f"{time.monotonic() - started:.3f}", details=error.details())
        return False
    log_event(log, logging.INFO, "loadgen.request", **fields, status="OK", seconds=f"{time.monotonic() - started:.3f}",
              prompt_tokens=summary.prompt_tokens if summary else None,
              generated_tokens=summary.generated_tokens if summary else None,
              evicted=sum(summary.evicted_per_layer) if summary else None,
              fail_open=summary.manager_fallback if summary else None)
    return True


def run(args: argparse.Namespace) -> int:
    numbers = itertools.count()
    lock = threading.Lock()
    sent, failures = [], []

    def loop(stub: worker_pb2_grpc.WorkerServiceStub) -> None:
        while True:
            with lock:
                number = next(numbers)
            if args.requests and number >= args.requests:
                return
            sent.append(number)
            if not send(stub, args, number):
                failures.append(number)
            if args.interval > 0:
                time.sleep(args.interval)

    with grpc.insecure_channel(args.worker, options=channel_options()) as channel:
        wait_serving(channel, args.wait)
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        threads = [threading.Thread(target=loop, args=(stub,), daemon=True) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # a timed join: SIGTERM and Ctrl-C are handled meanwhile
                thread.join(0.5)
    log_event(log, logging.INFO, "loadgen.done", requests=len(sent), failures=len(failures))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    logs.configure("INFO")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `docker stop`: PID 1 has no default action
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        return 130
    except TimeoutError as error:
        log_event(log, logging.ERROR, "loadgen.failed", error=str(error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
