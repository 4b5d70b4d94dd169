"""The metrics' parts without servers: numpy-accumulated histograms equal prometheus-client's own,
evicted scores come out of the selection for free and exactly, decisions report what they did,
the manager core and the generator count what happened, the gRPC interceptor counts each call
under its final status code, and the flags.

Real processes and both /metrics pages (promtool, the contract) are in test_metrics_services.
"""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from transformers import LlamaForCausalLM

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.metrics import CAOTE_ERROR_BUCKETS, ManagerMetrics
from kvevict.cache_manager.selection import select_keep, select_keep_scored
from kvevict.cache_manager.server import ServerConfig
from kvevict.cache_manager.service import AsyncManagerCore
from kvevict.cache_manager.state import AsyncInMemoryStateStore, InMemoryStateStore
from kvevict.cache_manager.transitions import report_step
from kvevict.grpc_server import RpcMetricsInterceptor
from kvevict.metrics import ArrayHistogram, LayerCounters, cumulative_counts, decade_buckets
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.metrics import WorkerMetrics
from kvevict.worker.remote_manager import ManagerUnavailable, RemoteManagerClient
from kvevict.worker.scheduler import ModelScheduler
from tests.metrics_support import parse
from tests.servers import free_port
from tests.test_manager_support import open_request, start
from tests.tiny_models import tiny_config


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# -- numpy-accumulated collectors ------------------------------------------------------------


def test_array_histogram_equals_prometheus_histogram_fed_one_value_at_a_time():
    edges = CAOTE_ERROR_BUCKETS
    rng = np.random.default_rng(0)
    values = np.concatenate([np.exp(rng.normal(-7, 4, 5000)), np.asarray(edges),  # exactly on the edges: le
                             [0.0, 1e-9, 11.0, np.inf]])
    registry = CollectorRegistry()
    reference = Histogram("reference", "one at a time", registry=registry, buckets=edges)
    for value in values:
        reference.observe(value)
    ours = ArrayHistogram("ours", "arrays", edges)
    for chunk in np.array_split(values, 7):
        ours.add(chunk.reshape(-1, 1))  # any shape
    registry.register(ours)
    page = parse(generate_latest(registry).decode())
    bounds = page.by_label("reference_bucket", "le")
    assert len(bounds) == len(edges) + 1
    for le in bounds:
        assert page.value("ours_bucket", le=le) == page.value("reference_bucket", le=le), le
    assert page.value("ours_count") == page.value("reference_count") == values.size
    finite = values[np.isfinite(values)]
    assert math.isclose(page.value("ours_sum"), float(finite.sum()), rel_tol=1e-12)  # +inf counted, not summed


def test_nan_counts_only_in_the_inf_bucket_and_the_sum_stays_finite():
    histogram = ArrayHistogram("h", "nan", (1.0, 2.0))
    histogram.add(np.array([0.5, np.nan, 3.0]))
    registry = CollectorRegistry()
    registry.register(histogram)
    assert [sample(registry, "h_bucket", le=le) for le in ("1.0", "2.0", "+Inf")] == [1, 1, 3]
    assert sample(registry, "h_count") == 3 and sample(registry, "h_sum") == 3.5


def test_tallies_added_later_are_in_every_scrape_after_the_call_and_a_backlog_runs_in_the_caller():
    histogram = ArrayHistogram("h", "later", (1.0, 2.0))
    registry = CollectorRegistry()
    registry.register(histogram)
    release, started = threading.Event(), threading.Event()
    callers = []

    def values(array):
        def compute():
            callers.append(threading.current_thread().name)
            if threading.current_thread().name.startswith("tally"):
                started.set()
                release.wait(10)  # the executor's tallies wait until the test lets them go
            return array
        return compute

    with ThreadPoolExecutor(1, thread_name_prefix="tally") as executor:
        histogram.add_later(values(np.array([0.5, 1.5])), executor, max_pending=2)
        assert started.wait(10)
        histogram.add_later(values(np.array([3.0])), executor, max_pending=2)
        # Two queued: the third is computed by the caller at once.
        histogram.add_later(values(np.array([0.1])), executor, max_pending=2)
        assert callers == ["tally_0", threading.current_thread().name]
        threading.Timer(0.2, release.set).start()
        # A scrape waits for the queued tallies: all four values are counted.
        assert [sample(registry, "h_bucket", le=le) for le in ("1.0", "2.0", "+Inf")] == [2, 3, 4]
    assert histogram.count == 4 and sample(registry, "h_sum") == 5.1


def test_cumulative_counts_are_le_counts():
    edges = np.array([1.0, 2.0, 5.0])
    assert cumulative_counts(edges, np.array([0.5, 1.0, 1.5, 2.0, 7.0])).tolist() == [2, 4, 4]
    assert decade_buckets(-1, 1) == (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def test_layer_counters_grow_with_the_largest_model_seen():
    counters = LayerCounters("c", "per layer")
    counters.add(np.array([1, 2]))
    counters.add(np.array([10, 20, 30]))
    assert counters.totals() == [11, 22, 30]


# -- what a decision did --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_the_evicted_scores_are_exactly_the_scores_of_the_evicted_tokens(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(3, 40)).astype(np.float64)  # many ties at the threshold
    budget, sink, recent = 17, 2, 3
    keep, evicted = select_keep_scored(scores, budget, sink, recent)
    assert np.array_equal(keep, select_keep(scores, budget, sink, recent))
    assert evicted.shape == (3, 40 - budget)
    for head in range(3):
        assert sorted(evicted[head]) == sorted(scores[head][~keep[head]])
    keep, evicted = select_keep_scored(scores[:, :budget], budget, sink, recent)  # nothing to evict
    assert keep.all() and evicted.shape == (3, 0)


@pytest.mark.parametrize("wrapper", ["", "caote", "fastcaote"])
def test_a_decision_reports_evaluated_kept_evicted_and_caote_errors_per_kv_head_entry(wrapper):
    session = start(open_request("tova", wrapper, budget=12, sink=1), seed=2)
    request, _ = session.build(30)
    stored = session.core.store.get(session.id)
    step = report_step(request)
    transition = step(stored)
    decision = step.decision
    response = transition.result
    heads = session.heads
    assert decision.evaluated_per_layer.tolist() == [30 * heads] * session.num_layers
    assert decision.kept_per_layer.tolist() == [12 * heads] * session.num_layers
    assert int(decision.evicted_per_layer.sum()) == response.evicted_tokens == 18 * heads * session.num_layers
    errors = decision.evicted_output_errors
    if wrapper:
        assert sum(e.size for e in errors) == response.evicted_tokens
        assert all(np.isfinite(e).all() and (e >= 0).all() for e in errors)
    else:
        assert errors == ()
    assert decision.seconds > 0
    # A retried sequence number decides nothing.
    retry = report_step(request)
    assert retry(transition.state).state is None and retry.decision is None


def test_the_manager_core_counts_sessions_reports_and_tokens():
    async def scenario():
        clock = [0.0]
        store = AsyncInMemoryStateStore(InMemoryStateStore(ttl_s=10, clock=lambda: clock[0]))
        metrics = ManagerMetrics(CollectorRegistry())
        metrics.watch_store(store)
        core = AsyncManagerCore(store, metrics=metrics)
        opened = await core.open_session(open_request("tova", "caote", budget=12, sink=1))
        driver = start(open_request("tova", "caote", budget=12, sink=1), seed=1)
        request, _ = driver.build(20)
        request.session_id = opened.session_id
        response = await core.report_block(request)
        await core.report_block(request)  # retried
        with pytest.raises(InvalidArgument):
            await core.report_block(pb.ReportBlockRequest(session_id="", phase=pb.PHASE_DECODE))
        other = await core.open_session(open_request("tova", budget=12))
        await core.close_session(pb.CloseSessionRequest(session_id=opened.session_id))
        clock[0] = 11.0  # the other session's TTL runs out
        assert await store.count() == 0
        return metrics.registry, response, other

    registry, response, _ = asyncio.run(scenario())
    assert sample(registry, "kvevict_manager_sessions_opened_total") == 2
    assert sample(registry, "kvevict_manager_sessions_closed_total") == 1
    assert sample(registry, "kvevict_manager_sessions_expired_total") == 1
    assert sample(registry, "kvevict_manager_reports_total", phase="prefill", outcome="decided") == 1
    assert sample(registry, "kvevict_manager_reports_total", phase="prefill", outcome="retry") == 1
    assert sample(registry, "kvevict_manager_reports_total", phase="decode", outcome="invalid") == 1
    evicted = sum(sample(registry, "kvevict_manager_tokens_evicted_total", layer=str(layer)) for layer in range(3))
    assert evicted == response.evicted_tokens > 0
    assert sample(registry, "kvevict_manager_evicted_caote_error_count") == response.evicted_tokens
    assert sample(registry, "kvevict_manager_layer_budget_tokens", layer="2") == 12
    assert sample(registry, "kvevict_manager_decision_duration_seconds_count") == 1
    assert sample(registry, "kvevict_manager_report_payload_bytes_count") == 3


# -- the worker's generation -----------------------------------------------------------------


class _LosingManager(EmbeddedManagerClient):
    """An embedded manager that becomes unreachable after `answers` reports."""

    def __init__(self, answers: int) -> None:
        super().__init__()
        self.answers = answers

    def report_block(self, request):
        if self.answers == 0:
            raise ManagerUnavailable("gone")
        self.answers -= 1
        return super().report_block(request)


@pytest.mark.parametrize("manager", ["embedded", "lost"])
def test_a_generation_counts_tokens_evictions_round_trips_and_leaves_no_kv_bytes(manager):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    metrics = WorkerMetrics(CollectorRegistry())
    settings = EvictionSettings(policy=pb.PolicySpec(base="tova", wrapper="caote"), budget=pb.BudgetSpec(tokens=16),
                                block_size=8)
    client = EmbeddedManagerClient() if manager == "embedded" else _LosingManager(answers=3)
    result = EvictingGenerator(model, client, settings, metrics=metrics).generate(torch.arange(3, 40), 20)
    summary = result.summary
    registry = metrics.registry
    assert sample(registry, "kvevict_worker_evicted_tokens_total") == sum(summary.evicted_per_layer) > 0
    assert sample(registry, "kvevict_worker_generated_tokens_total") == summary.generated_tokens == 20
    assert sample(registry, "kvevict_worker_prompt_tokens_total") == summary.prompt_tokens == 37
    assert sample(registry, "kvevict_worker_decode_token_duration_seconds_count") == 20
    assert 0 < sample(registry, "kvevict_worker_decode_token_duration_seconds_sum") <= summary.decode_seconds
    assert sample(registry, "kvevict_worker_prefill_duration_seconds_count") == 1
    lost = manager == "lost"
    assert sample(registry, "kvevict_worker_manager_fallbacks_total") == lost == summary.manager_fallback
    # Every call is timed, the one that failed too.
    assert sample(registry, "kvevict_worker_manager_round_trip_seconds_count") == summary.reports + lost
    assert sample(registry, "kvevict_worker_kv_cache_bytes") == 0
    assert sample(registry, "kvevict_worker_kv_cache_full_bytes") == 0
    assert sample(registry, "kvevict_worker_decode_tokens_per_second") > 0


def test_the_kv_gauges_follow_the_cache_while_it_generates():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).eval()
    metrics = WorkerMetrics(CollectorRegistry())
    settings = EvictionSettings(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=16), block_size=8)
    seen = []

    def on_token(_):
        seen.append((sample(metrics.registry, "kvevict_worker_kv_cache_bytes"),
                     sample(metrics.registry, "kvevict_worker_kv_cache_full_bytes")))

    result = EvictingGenerator(model, EmbeddedManagerClient(), settings, metrics=metrics).generate(
        torch.arange(3, 40), 12, on_token=on_token)
    assert all(0 < kv <= full for kv, full in seen)
    assert max(kv for kv, _ in seen) <= result.summary.peak_kv_bytes
    # The last token needs no forward: the gauge then holds the cache the summary ends with.
    assert seen[-1] == (result.summary.kv_bytes, result.summary.full_cache_bytes)


def test_remote_retries_are_counted():
    metrics = WorkerMetrics(CollectorRegistry())
    client = RemoteManagerClient(f"127.0.0.1:{free_port()}", timeout_s=0.5, retries=2, backoff_s=0.01,
                                 on_retry=metrics.retried)
    try:
        with pytest.raises(ManagerUnavailable):
            client.open_session(open_request())
    finally:
        client.close()
    assert sample(metrics.registry, "kvevict_worker_manager_retries_total") == 2


def test_queue_depth_counts_the_waiting_jobs_not_the_running_one():
    scheduler = ModelScheduler(max_queue=4)
    release = threading.Event()
    started = threading.Event()
    metrics = WorkerMetrics(CollectorRegistry(), queue_depth=lambda: scheduler.waiting)
    try:
        running = scheduler.submit(lambda: (started.set(), release.wait(10)))
        started.wait(10)
        waiting = [scheduler.submit(lambda: None) for _ in range(2)]
        assert sample(metrics.registry, "kvevict_worker_queue_depth") == 2
        waiting[1].cancel()
        assert sample(metrics.registry, "kvevict_worker_queue_depth") == 1
        release.set()
        running.result(10)
        waiting[0].result(10)
        assert sample(metrics.registry, "kvevict_worker_queue_depth") == 0
    finally:
        release.set()
        scheduler.close()


# -- the gRPC interceptor --------------------------------------------------------------------


def test_the_interceptor_counts_every_call_under_its_final_status_code():
    recorded: list[tuple[str, str]] = []

    async def ok(request, context):
        return b"ok"

    async def invalid(request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "field: bad")

    async def broken(request, context):
        raise ValueError("a bug")

    async def set_code(request, context):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        return b""

    async def stream(request, context):
        for i in range(3):
            yield bytes([i])
        await context.abort(grpc.StatusCode.ABORTED, "stop")

    async def endless(request, context):
        while True:
            yield b"x"
            await asyncio.sleep(0.01)

    handlers = {"Ok": grpc.unary_unary_rpc_method_handler(ok), "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
                "Broken": grpc.unary_unary_rpc_method_handler(broken),
                "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
                "Endless": grpc.unary_stream_rpc_method_handler(endless)}

    async def scenario():
        server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(lambda m, c, s: recorded.append((m, c)))])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Service", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            for name in ("Ok", "Invalid", "Broken", "SetCode"):
                try:
                    await chan.unary_unary(f"/test.Service/{name}")(b"", timeout=10)
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    codes[name] = error.code()
            call = chan.unary_stream("/test.Service/Stream")(b"", timeout=10)
            try:
                assert len([m async for m in call]) == 3
            except grpc.aio.AioRpcError as error:
                codes["Stream"] = error.code()
            call = chan.unary_stream("/test.Service/Endless")(b"", timeout=10)
            await call.read()
            call.cancel()
            for _ in range(200):  # the server learns of the cancellation asynchronously
                if any(m == "Endless" for m, _ in recorded):
                    break
                await asyncio.sleep(0.01)
        await server.stop(None)
        return codes

    codes = asyncio.run(scenario())
    assert codes == {"Ok": grpc.StatusCode.OK, "Invalid": grpc.StatusCode.INVALID_ARGUMENT,
                     "Broken": grpc.StatusCode.UNKNOWN, "SetCode": grpc.StatusCode.NOT_FOUND,
                     "Stream": grpc.StatusCode.ABORTED}
    assert sorted(recorded) == sorted([("Ok", "OK"), ("Invalid", "INVALID_ARGUMENT"), ("Broken", "UNKNOWN"),
                                       ("SetCode", "NOT_FOUND"), ("Stream", "ABORTED"), ("Endless", "CANCELLED")])


# -- flags -----------------------------------------------------------------------------------


def test_metrics_port_flags_default_follow_the_environment_and_are_checked(monkeypatch):
    import argparse

    from kvevict.cache_manager.command import add_serve_flags as manager_flags
    from kvevict.worker.command import add_serve_flags as worker_flags

    def parsed(add_flags, *argv):
        parser = argparse.ArgumentParser()
        add_flags(parser)
        return parser.parse_args(list(argv)).metrics_port

    assert parsed(manager_flags) == 9464 and parsed(worker_flags) == 9465
    monkeypatch.setenv("KVEVICT_MANAGER_METRICS_PORT", "0")
    monkeypatch.setenv("KVEVICT_WORKER_METRICS_PORT", "-1")
    assert parsed(manager_flags) == 0 and parsed(worker_flags) == -1
    assert parsed(manager_flags, "--metrics-port", "-1") == -1  # the flag wins
    assert ServerConfig(metrics_port=-1).metrics_port == -1
    for bad in (-2, 70000):
        with pytest.raises(ValueError, match="metrics port"):
            ServerConfig(metrics_port=bad)
