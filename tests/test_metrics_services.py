"""Both /metrics pages after real traffic: a Redis-backed `kvevict manager serve` and a `kvevict
worker serve` using it, each a process of its own, a few generations and a Score with eviction,
direct manager calls (a retried and an out-of-order report) and bad requests.

The pages pass `promtool check metrics`, show every metric of the contract (the dashboards have
no dead panels), and their numbers are what happened: tokens evicted as in the summaries (the
worker per KV head, the manager per KV head entry), one ReportBlock OK per report, each bad call
under its status code, the CAOTE histogram counting exactly the tokens caote sessions evicted.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from tests.checkpoints import TEXT, save_tiny_checkpoint
from tests.metrics_support import PROMTOOL, Page, delta, promtool_check, scrape
from tests.servers import ServerProcess, channel, metrics_port, start_manager, wait_until
from tests.test_manager_support import open_request, start
from tests.test_worker_service import WORKER_READY, worker_argv

TIMEOUT = 60
PROMPT = TEXT * 2  # ~70 tokens: several prefill blocks, evicting from the first report


def eviction(base: str, wrapper: str = "", budget: int = 16) -> worker_pb2.EvictionOptions:
    return worker_pb2.EvictionOptions(policy=pb.PolicySpec(base=base, wrapper=wrapper), budget=pb.BudgetSpec(tokens=budget),
                                      block_size=8)


# (eviction, counted by the CAOTE histogram, max new tokens)
GENERATIONS = [
    (eviction("tova", "caote"), True, 24),
    (eviction("h2o"), False, 20),
    (eviction("snapkv", "fastcaote", budget=20), True, 12),
]
SCORED = (eviction("keydiff", "fastcaote"), True)

# Every metric of the contract, with its type (what the Grafana dashboards query).
MANAGER_CONTRACT = {
    "kvevict_manager_sessions_active": "gauge",
    "kvevict_manager_head_budget_ratio": "histogram",
    "kvevict_manager_sessions_opened_total": "counter",
    "kvevict_manager_sessions_closed_total": "counter",
    "kvevict_manager_sessions_expired_total": "counter",
    "kvevict_manager_reports_total": "counter",
    "kvevict_manager_tokens_evaluated_total": "counter",
    "kvevict_manager_tokens_evicted_total": "counter",
    "kvevict_manager_tokens_kept_total": "counter",
    "kvevict_manager_layer_budget_tokens": "gauge",
    "kvevict_manager_evicted_caote_error": "histogram",
    "kvevict_manager_decision_duration_seconds": "histogram",
    "kvevict_manager_report_payload_bytes": "histogram",
    "kvevict_manager_redis_operation_duration_seconds": "histogram",
    "kvevict_manager_redis_errors_total": "counter",
    "kvevict_manager_rpcs_total": "counter",
    "kvevict_manager_rpc_duration_seconds": "histogram",
}
WORKER_CONTRACT = {
    "kvevict_worker_requests_total": "counter",
    "kvevict_worker_generated_tokens_total": "counter",
    "kvevict_worker_prompt_tokens_total": "counter",
    "kvevict_worker_evicted_tokens_total": "counter",
    "kvevict_worker_prefill_duration_seconds": "histogram",
    "kvevict_worker_decode_token_duration_seconds": "histogram",
    "kvevict_worker_decode_tokens_per_second": "gauge",
    "kvevict_worker_kv_cache_bytes": "gauge",
    "kvevict_worker_kv_cache_full_bytes": "gauge",
    "kvevict_worker_manager_round_trip_seconds": "histogram",
    "kvevict_worker_manager_retries_total": "counter",
    "kvevict_worker_manager_fallbacks_total": "counter",
    "kvevict_worker_queue_depth": "gauge",
    "kvevict_worker_rpcs_total": "counter",
    "kvevict_worker_rpc_duration_seconds": "histogram",
}


@dataclass
class System:
    manager: ServerProcess
    worker: ServerProcess
    manager_stub: pb_grpc.CacheManagerServiceStub
    worker_stub: worker_pb2_grpc.WorkerServiceStub
    kv_heads: int

    def pages(self) -> tuple[Page, Page]:
        return scrape(self.manager.metrics_port), scrape(metrics_port(self.worker))


@pytest.fixture(scope="module")
def system(module_redis, tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))
    kv_heads = json.loads((checkpoint / "config.json").read_text())["num_key_value_heads"]
    manager = start_manager(module_redis.url)
    worker = ServerProcess(worker_argv(checkpoint, "--manager", manager.address, "--no-fail-open"), WORKER_READY,
                           name="worker")
    try:
        worker.wait_ready(120)
    except BaseException:
        worker.kill()
        manager.kill()
        raise
    manager_channel = channel(manager.address)
    worker_channel = channel(f"127.0.0.1:{worker.match.group(1)}")
    yield System(manager, worker, pb_grpc.CacheManagerServiceStub(manager_channel),
                 worker_pb2_grpc.WorkerServiceStub(worker_channel), kv_heads)
    for chan in (manager_channel, worker_channel):
        chan.close()
    worker.kill()
    manager.kill()


class RemoteCore:
    """The ManagerCore calls test_manager_support's session driver makes, over gRPC."""

    def __init__(self, stub: pb_grpc.CacheManagerServiceStub) -> None:
        self.stub = stub

    def open_session(self, request):
        return self.stub.OpenSession(request, timeout=TIMEOUT)

    def report_block(self, request):
        return self.stub.ReportBlock(request, timeout=TIMEOUT)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


@dataclass
class Traffic:
    before: tuple[Page, Page]
    after: tuple[Page, Page]
    summaries: list  # (EvictionSummary proto, counted by the CAOTE histogram, is a generation)
    direct_evicted: int  # manager tokens evicted by the direct session's decisions (caote)
    direct_reports: int  # direct ReportBlock calls answered OK (decided + retried)
    direct_decided: int


@pytest.fixture(scope="module")
def traffic(system: System) -> Traffic:
    before = system.pages()
    summaries = []
    for options, caote, max_new_tokens in GENERATIONS:
        messages = list(system.worker_stub.Generate(
            worker_pb2.GenerateRequest(text=PROMPT, max_new_tokens=max_new_tokens, eviction=options), timeout=TIMEOUT))
        summaries.append((messages[-1].summary, caote, True))
    options, caote = SCORED
    scored = system.worker_stub.Score(worker_pb2.ScoreRequest(text=PROMPT, eviction=options), timeout=TIMEOUT)
    summaries.append((scored.summary, caote, False))

    # Bad worker requests: a field invalid, a request too large.
    assert _code(lambda: list(system.worker_stub.Generate(worker_pb2.GenerateRequest(text=""), timeout=TIMEOUT))) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: list(system.worker_stub.Generate(
        worker_pb2.GenerateRequest(text="x", max_new_tokens=10**6), timeout=TIMEOUT))) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Direct manager calls: a caote session with two decisions, a retry and an out-of-order report.
    stub = system.manager_stub
    session = start(open_request("tova", "caote", budget=12, sink=1), seed=3, core=RemoteCore(stub))
    first = session.report(16)
    request, _ = session.build(16, phase=pb.PHASE_DECODE)
    second = stub.ReportBlock(request, timeout=TIMEOUT)
    session.apply(request, second)
    retried = stub.ReportBlock(request, timeout=TIMEOUT)  # the same sequence number again
    assert retried.SerializeToString() == second.SerializeToString()
    ahead, _ = session.build(8)
    ahead.sequence += 1
    assert _code(lambda: stub.ReportBlock(ahead, timeout=TIMEOUT)) == grpc.StatusCode.ABORTED
    stub.CloseSession(pb.CloseSessionRequest(session_id=session.id), timeout=TIMEOUT)
    # Bad manager calls.
    assert _code(lambda: stub.ReportBlock(pb.ReportBlockRequest(phase=pb.PHASE_PREFILL), timeout=TIMEOUT)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stub.ReportBlock(pb.ReportBlockRequest(session_id="0" * 32, sequence=1, phase=pb.PHASE_DECODE),
                                          timeout=TIMEOUT)) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: stub.OpenSession(open_request("nope"), timeout=TIMEOUT)) == grpc.StatusCode.INVALID_ARGUMENT
    assert first.evicted_tokens > 0 and second.evicted_tokens > 0
    # The server counts an RPC once its status is sent: the client may read the page first.
    after = wait_until(lambda: (pages := system.pages())[0].value(
        "kvevict_manager_rpcs_total", method="OpenSession", code="INVALID_ARGUMENT") and pages,
        timeout_s=10, what="the last bad call to be counted")
    return Traffic(before, after, summaries, direct_evicted=first.evicted_tokens + second.evicted_tokens,
                   direct_reports=3, direct_decided=2)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
@pytest.mark.parametrize("page", ["manager", "worker"])
def test_promtool_accepts_both_pages_after_real_traffic(traffic, page):
    text = traffic.after[0 if page == "manager" else 1].text
    result = promtool_check(text)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"


@pytest.mark.parametrize("page,contract", [("manager", MANAGER_CONTRACT), ("worker", WORKER_CONTRACT)])
def test_every_metric_of_the_contract_is_on_its_page_with_its_type_and_samples(traffic, page, contract):
    after = traffic.after[0 if page == "manager" else 1]
    for name, kind in contract.items():
        assert after.types.get(name) == kind, f"{name} ({kind}) missing or mistyped"
        sample = name + ("_count" if kind == "histogram" else "")
        assert any(n == sample for n, _ in after.samples), f"{name} has no samples"
    # No per-session label anywhere; token and error metrics are per layer at most.
    labels = {key for (_, ls) in after.samples for key, _ in ls}
    assert not labels & {"session", "session_id", "request", "request_id"}


def test_tokens_evicted_agree_with_the_summaries_on_both_sides(system, traffic):
    (manager_before, worker_before), (manager_after, worker_after) = traffic.before, traffic.after
    per_head = sum(sum(s.evicted_per_layer) for s, _, _ in traffic.summaries)
    assert per_head > 0
    assert delta(worker_after, worker_before, "kvevict_worker_evicted_tokens_total") == per_head
    # The manager counts every (layer, KV head, token) entry, like ReportBlockResponse.evicted_tokens.
    evicted = delta(manager_after, manager_before, "kvevict_manager_tokens_evicted_total")
    assert evicted == system.kv_heads * per_head + traffic.direct_evicted
    # evaluated = kept + evicted, layer by layer.
    for layer in manager_after.by_label("kvevict_manager_tokens_evaluated_total", "layer"):
        evaluated, kept, dropped = (delta(manager_after, manager_before, f"kvevict_manager_tokens_{what}_total", layer=layer)
                                    for what in ("evaluated", "kept", "evicted"))
        assert evaluated == kept + dropped and evaluated > 0
    # The CAOTE histogram holds one value per token evicted by a caote / fastcaote session.
    caote = system.kv_heads * sum(sum(s.evicted_per_layer) for s, counted, _ in traffic.summaries if counted)
    name = "kvevict_manager_evicted_caote_error"
    assert delta(manager_after, manager_before, f"{name}_count") == caote + traffic.direct_evicted
    assert delta(manager_after, manager_before, f"{name}_bucket", le="+Inf") == caote + traffic.direct_evicted
    assert delta(manager_after, manager_before, f"{name}_sum") > 0
    buckets = sorted((float(le), v) for le, v in manager_after.by_label(f"{name}_bucket", "le").items())
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative


def test_reports_and_rpcs_are_counted_by_outcome_and_status_code(system, traffic):
    (manager_before, worker_before), (manager_after, worker_after) = traffic.before, traffic.after

    def manager(name, **labels):
        return delta(manager_after, manager_before, name, **labels)

    reports = sum(s.reports for s, _, _ in traffic.summaries)
    rpcs = "kvevict_manager_rpcs_total"
    assert manager(rpcs, method="ReportBlock", code="OK") == reports + traffic.direct_reports
    assert manager(rpcs, method="ReportBlock", code="INVALID_ARGUMENT") == 1
    assert manager(rpcs, method="ReportBlock", code="NOT_FOUND") == 1
    assert manager(rpcs, method="ReportBlock", code="ABORTED") == 1
    assert manager(rpcs, method="OpenSession", code="INVALID_ARGUMENT") == 1
    sessions = len(traffic.summaries) + 1
    assert manager(rpcs, method="OpenSession", code="OK") == sessions
    assert manager(rpcs, method="CloseSession", code="OK") == sessions
    assert manager("kvevict_manager_rpc_duration_seconds_count", method="ReportBlock") == reports + traffic.direct_reports + 3

    outcomes = "kvevict_manager_reports_total"
    decided = reports + traffic.direct_decided
    assert manager(outcomes, outcome="decided") == decided
    assert manager(outcomes, outcome="decided", phase="decode") >= 1  # the direct decode report at least
    assert manager(outcomes, outcome="retry", phase="decode") == 1
    assert manager(outcomes, outcome="aborted", phase="prefill") == 1
    assert manager(outcomes, outcome="invalid", phase="prefill") == 1
    assert manager(outcomes, outcome="not_found", phase="decode") == 1
    assert manager(outcomes, outcome="unavailable") == 0
    assert manager("kvevict_manager_decision_duration_seconds_count") == decided
    assert manager("kvevict_manager_report_payload_bytes_count") == decided + 4  # + retry, aborted, invalid, not found
    assert manager("kvevict_manager_sessions_opened_total") == sessions
    assert manager("kvevict_manager_sessions_closed_total") == sessions
    assert manager("kvevict_manager_redis_operation_duration_seconds_count", operation="update") >= decided
    assert manager("kvevict_manager_redis_errors_total") == 0
    budgets = manager_after.by_label("kvevict_manager_layer_budget_tokens", "layer")
    assert budgets and all(value > 0 for value in budgets.values())

    def worker(name, **labels):
        return delta(worker_after, worker_before, name, **labels)

    generations = [s for s, _, generated in traffic.summaries if generated]
    assert worker("kvevict_worker_requests_total", method="generate", outcome="ok") == len(generations)
    assert worker("kvevict_worker_requests_total", method="score", outcome="ok") == 1
    assert worker("kvevict_worker_requests_total", method="generate", outcome="invalid") == 1
    assert worker("kvevict_worker_requests_total", method="generate", outcome="rejected") == 1
    assert worker("kvevict_worker_requests_total") == len(traffic.summaries) + 2
    assert worker("kvevict_worker_rpcs_total", method="Generate", code="OK") == len(generations)
    assert worker("kvevict_worker_rpcs_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert worker("kvevict_worker_rpcs_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1
    assert worker("kvevict_worker_rpcs_total", method="Score", code="OK") == 1
    assert worker("kvevict_worker_manager_round_trip_seconds_count") == reports


def test_worker_token_counts_and_timings_match_the_summaries(traffic):
    (_, before), (_, after) = traffic.before, traffic.after
    generated = sum(s.generated_tokens for s, _, _ in traffic.summaries)
    assert delta(after, before, "kvevict_worker_generated_tokens_total") == generated > 0
    assert delta(after, before, "kvevict_worker_prompt_tokens_total") == sum(s.prompt_tokens for s, _, _ in traffic.summaries)
    # One observation per generated token; their sum is the summaries' decode time.
    assert delta(after, before, "kvevict_worker_decode_token_duration_seconds_count") == generated
    decode_seconds = sum(s.decode_seconds for s, _, _ in traffic.summaries)
    assert 0 < delta(after, before, "kvevict_worker_decode_token_duration_seconds_sum") <= decode_seconds
    assert delta(after, before, "kvevict_worker_prefill_duration_seconds_count") == len(traffic.summaries)
    assert after.value("kvevict_worker_decode_tokens_per_second") > 0
    # Nothing in flight: the finished requests took their KV bytes out of the gauges.
    assert after.value("kvevict_worker_kv_cache_bytes") == 0
    assert after.value("kvevict_worker_kv_cache_full_bytes") == 0
    assert after.value("kvevict_worker_queue_depth") == 0
    assert delta(after, before, "kvevict_worker_manager_fallbacks_total") == 0
    assert delta(after, before, "kvevict_worker_manager_retries_total") == 0


def test_a_cancelled_generation_is_counted_and_leaves_no_kv_bytes_behind(system, traffic):
    _, before = system.pages()
    call = system.worker_stub.Generate(worker_pb2.GenerateRequest(
        text=PROMPT, max_new_tokens=4000, eviction=eviction("tova", "caote")), timeout=TIMEOUT)
    next(call)
    # While it generates, the gauges hold its cache (the full one at least as much).
    _, during = system.pages()
    assert during.value("kvevict_worker_kv_cache_full_bytes") >= during.value("kvevict_worker_kv_cache_bytes") > 0
    call.cancel()

    def settled():
        page = system.pages()[1]
        return page if delta(page, before, "kvevict_worker_requests_total", outcome="cancelled") == 1 else None

    after = wait_until(settled, timeout_s=30, what="the cancelled request to be counted")
    assert delta(after, before, "kvevict_worker_requests_total", method="generate", outcome="cancelled") == 1
    assert delta(after, before, "kvevict_worker_rpcs_total", method="Generate", code="CANCELLED") == 1
    wait_until(lambda: system.pages()[1].value("kvevict_worker_kv_cache_bytes") == 0, timeout_s=30,
               what="the KV gauge back to 0")
    assert system.pages()[1].value("kvevict_worker_kv_cache_full_bytes") == 0


def test_open_sessions_are_refreshed_by_the_probe_and_expired_ones_counted(redis_server):
    manager = start_manager(redis_server.url, "--session-ttl", "3")
    try:
        port = manager.metrics_port
        with channel(manager.address) as chan:
            stub = pb_grpc.CacheManagerServiceStub(chan)
            session = start(open_request("tova", budget=12), core=RemoteCore(stub))
            wait_until(lambda: scrape(port).value("kvevict_manager_sessions_active") == 1, timeout_s=10,
                       what="one open session")
            # Nobody writes: its TTL runs out, the probe prunes it from the index and counts it.
            page = wait_until(lambda: (p := scrape(port)).value("kvevict_manager_sessions_expired_total") == 1 and p,
                              timeout_s=15, what="the session to expire")
            assert page.value("kvevict_manager_sessions_active") == 0
            request, _ = session.build(8, phase=pb.PHASE_DECODE)
            assert _code(lambda: stub.ReportBlock(request, timeout=TIMEOUT)) == grpc.StatusCode.NOT_FOUND
            page = scrape(port)
            assert page.value("kvevict_manager_reports_total", phase="decode", outcome="not_found") == 1
            assert page.value("kvevict_manager_sessions_closed_total") == 0
            assert page.value("kvevict_manager_sessions_expired_total") == 1
    finally:
        manager.kill()


def test_metrics_port_minus_one_serves_none_and_a_taken_one_is_an_error():
    manager = start_manager("memory://", "--metrics-port", "-1")
    try:
        assert "metrics_port=" not in manager.match.string
    finally:
        manager.kill()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "kvevict.cli", "manager", "serve", "--port", "0",
                                 "--metrics-port", str(taken.getsockname()[1])],
                                capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert "cannot serve metrics on 127.0.0.1:" in result.stderr
