"""The distributed system end to end: `kvevict worker serve` -> `kvevict manager serve` -> a real
redis-server, each a process of its own, on the shipped demo model."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import load_model
from kvevict.worker.prompts import eos_token_ids
from tests.servers import ServerProcess, channel, free_port, start_manager
from tests.test_worker_service import WORKER_READY, worker_argv

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo-py"
PROMPT = (ROOT / "examples" / "demo_prompt.py").read_text()[:1200]
POLICY = pb.PolicySpec(base="h2o", wrapper="caote", sink_tokens=4)  # stateful: accumulators live in Redis
BUDGET, BLOCK = 64, 16


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    model, tokenizer = load_model(str(MODEL))
    return model, tokenizer


def _embedded(reference, max_new_tokens: int, allocator: str = "uniform"):
    model, tokenizer = reference
    settings = EvictionSettings(policy=POLICY, budget=pb.BudgetSpec(tokens=BUDGET, allocator=allocator),
                                block_size=BLOCK)
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    return EvictingGenerator(model, EmbeddedManagerClient(), settings).generate(
        prompt, max_new_tokens, eos_token_ids=eos_token_ids(tokenizer, model))


def _request(max_new_tokens: int, allocator: str = "uniform") -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        text=PROMPT, max_new_tokens=max_new_tokens,
        eviction=worker_pb2.EvictionOptions(policy=POLICY, budget=pb.BudgetSpec(tokens=BUDGET, allocator=allocator),
                                            block_size=BLOCK))


def _start_worker(manager_address: str, *flags: str) -> tuple[ServerProcess, worker_pb2_grpc.WorkerServiceStub]:
    worker = ServerProcess(worker_argv(MODEL, "--manager", manager_address, "--no-fail-open", *flags), WORKER_READY,
                           name="worker")
    worker.wait_ready(120)
    return worker, worker_pb2_grpc.WorkerServiceStub(channel(f"127.0.0.1:{worker.match.group(1)}"))


# Per-head allocators: a per-head session's state (KVST2) in Redis, its ragged reports and keeps over gRPC.
@pytest.mark.parametrize("allocator", ["uniform", "adahead", "global"])
def test_worker_manager_redis_yields_exactly_the_tokens_of_embedded_mode(redis_server, reference, allocator):
    manager = start_manager(redis_server.url)
    worker, stub = _start_worker(manager.address)
    try:
        messages = list(stub.Generate(_request(40, allocator), timeout=120))
    finally:
        worker.kill()
        manager.kill()
    tokens = [t for m in messages for t in m.token_ids]
    summary = messages[-1].summary
    expected = _embedded(reference, 40, allocator)
    assert tokens == expected.token_ids
    assert list(summary.evicted_per_layer) == expected.summary.evicted_per_layer
    assert list(summary.final_lengths) == expected.summary.final_lengths
    assert list(summary.final_head_lengths) == expected.summary.final_head_lengths
    assert (len(set(summary.final_head_lengths)) > 1) == (allocator != "uniform")
    assert not summary.manager_fallback and min(summary.evicted_per_layer) > 0
    print(f"\nworker -> manager -> redis: {summary.reports} reports, "
          f"{summary.manager_seconds / summary.reports * 1e3:.2f} ms per ReportBlock round trip on average, "
          f"{summary.report_bytes / summary.reports / 1024:.1f} KiB per report")
    client = redis_server.client()
    assert client.keys("kvevict:{*}:state*") == []  # closed sessions leave nothing behind
    assert client.zcard("kvevict:sessions") == 0


def test_a_generation_survives_a_manager_restart_with_its_state_in_redis(redis_server, reference):
    port = free_port()
    manager = start_manager(redis_server.url, "--port", str(port))
    worker, stub = _start_worker(f"127.0.0.1:{port}", "--manager-timeout", "2", "--manager-retries", "12")
    restarted = None
    try:
        tokens, summary = [], None
        for message in stub.Generate(_request(160), timeout=300):
            tokens.extend(message.token_ids)
            if message.HasField("summary"):
                summary = message.summary
            if len(tokens) == 20 and restarted is None:
                manager.kill()  # SIGKILL: nothing flushed, nothing said goodbye
                time.sleep(1.0)  # reports made meanwhile are retried by the worker
                restarted = start_manager(redis_server.url, "--port", str(port), "--log-level", "DEBUG")
    finally:
        worker.kill()
        manager.kill()
        if restarted is not None:
            restarted.kill()
    assert restarted is not None
    # The new process decided reports of the session the killed one had opened (from Redis).
    assert restarted.lines(r"event=rpc\.ok method=ReportBlock"), restarted.output
    # Fail-open is off and H2O's accumulators live only in Redis: equal tokens prove that the new
    # manager process continued the session where the killed one left it.
    expected = _embedded(reference, 160)
    assert tokens == expected.token_ids
    assert not summary.manager_fallback
    assert list(summary.evicted_per_layer) == expected.summary.evicted_per_layer
