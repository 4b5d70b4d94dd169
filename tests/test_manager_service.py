"""CacheManagerService through real gRPC: two manager replicas (subprocesses) sharing one real
redis-server. Whichever replica serves a report, the decision is byte for byte the one an
in-process ManagerCore makes; retries are idempotent across replicas; a race on one sequence
number stores one decision; every malformed request gets its status code, naming the field, and
changes nothing; reflection alone is enough to call the service."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from kvevict.cache_manager import InMemoryStateStore, ManagerCore, SessionState
from kvevict.cache_manager.redis_store import session_key
from kvevict.cache_manager.transitions import policies_response
from kvevict.v1 import cache_manager_pb2 as pb
from tests.reflection_v1 import check_reflection_v1
from tests.servers import channel, manager_stub, start_managers
from tests.test_manager_support import GEOMETRY, Session, open_request
from tests.test_manager_validation import OPEN_CASES, REPORT_CASES

TIMEOUT = 20  # seconds; generous: the machine is shared


@dataclass
class Replicas:
    stubs: list
    processes: list
    redis: object


@pytest.fixture(scope="module")
def replicas(module_redis) -> Iterator[Replicas]:
    managers = start_managers(2, module_redis.url)
    channels = [channel(m.address) for m in managers]
    try:
        yield Replicas([manager_stub(c) for c in channels], managers, module_redis)
    finally:
        for c in channels:
            c.close()
        for m in managers:
            m.kill()


class Alternating:
    """Duck-types ManagerCore.report_block for tests.test_manager_support.Session: each report
    goes to the next replica in turn."""

    def __init__(self, stubs: list) -> None:
        self.stubs = stubs
        self.calls = 0

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        stub = self.stubs[self.calls % len(self.stubs)]
        self.calls += 1
        return stub.ReportBlock(request, timeout=TIMEOUT)


def remote_session(stubs: list, request: pb.OpenSessionRequest, seed: int = 0) -> Session:
    opened = stubs[0].OpenSession(request, timeout=TIMEOUT)
    geometry = request.geometry
    return Session(Alternating(stubs), opened, np.random.default_rng(seed),
                   num_layers=geometry.num_layers, heads=geometry.num_kv_heads)


def renamed(request: pb.ReportBlockRequest, session_id: str) -> pb.ReportBlockRequest:
    copy = pb.ReportBlockRequest()
    copy.CopyFrom(request)
    copy.session_id = session_id
    return copy


def info(stub, session_id: str) -> pb.GetSessionResponse:
    return stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT)


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=TIMEOUT)
    return raised.value


@pytest.mark.parametrize("base,wrapper", [("h2o", "caote"), ("snapkv", "fastcaote"), ("keydiff", "")])
def test_reports_alternating_between_replicas_decide_as_one_in_process_core(replicas: Replicas, base, wrapper) -> None:
    request = open_request(base, wrapper, budget=12, sink=1)
    session = remote_session(replicas.stubs, request, seed=3)
    reference = ManagerCore(InMemoryStateStore())
    expected_open = reference.open_session(request)
    assert renamed_open(session.opened) == renamed_open(expected_open)
    for new_tokens, phase in [(10, pb.PHASE_PREFILL), (7, pb.PHASE_PREFILL), (9, pb.PHASE_PREFILL),
                              (1, pb.PHASE_DECODE), (2, pb.PHASE_DECODE), (4, pb.PHASE_DECODE)]:
        report, _ = session.build(new_tokens, phase)
        answer = session.core.report_block(report)
        expected = reference.report_block(renamed(report, expected_open.session_id))
        assert answer.SerializeToString() == expected.SerializeToString()
        session.apply(report, answer)
    assert session.core.calls == 6  # three reports on each replica
    mine = reference.get_session(pb.GetSessionRequest(session_id=expected_open.session_id))
    for stub in replicas.stubs:
        theirs = info(stub, session.id)
        theirs.session_id = mine.session_id
        assert theirs.SerializeToString() == mine.SerializeToString()
    assert mine.reports == 6 and list(mine.cache_lengths) == [12] * GEOMETRY["num_layers"]


def renamed_open(response: pb.OpenSessionResponse) -> bytes:
    copy = pb.OpenSessionResponse()
    copy.CopyFrom(response)
    copy.session_id = ""
    return copy.SerializeToString()


def test_get_session_reports_resolved_settings_and_counters(replicas: Replicas) -> None:
    session = remote_session(replicas.stubs, open_request("snapkv", "caote", budget=40, block_size=8))
    before = info(replicas.stubs[1], session.id)
    assert (before.reports, before.last_sequence, before.evicted_tokens) == (0, 0, 0)
    assert (before.policy.window, before.policy.pool_kernel) == (32, 7)  # defaults filled in
    assert (before.policy.sink_tokens, before.policy.recent_tokens) == (0, 20)
    assert before.budget.allocator == "uniform" and before.block_size == 8
    assert list(before.cache_lengths) == [0, 0, 0] and list(before.layer_budgets) == [40] * 3
    evicted = session.report(44).evicted_tokens
    after = info(replicas.stubs[0], session.id)
    assert (after.reports, after.last_sequence, after.evicted_tokens) == (1, 1, evicted)
    assert evicted == 4 * 3 * 2 and list(after.cache_lengths) == [40] * 3


def test_list_policies_is_the_registry(replicas: Replicas) -> None:
    answer = replicas.stubs[1].ListPolicies(pb.ListPoliciesRequest(), timeout=TIMEOUT)
    assert answer.SerializeToString() == policies_response().SerializeToString()
    assert {p.name for p in answer.policies if p.kind == "base"} >= {"h2o", "tova", "snapkv"}


def test_a_retried_report_returns_the_same_bytes_on_any_replica_and_changes_nothing(replicas: Replicas) -> None:
    a, b = replicas.stubs
    session = remote_session([a], open_request("h2o", "caote", budget=12, sink=1), seed=2)
    session.report(10)
    report, _ = session.build(8)
    answer = a.ReportBlock(report, timeout=TIMEOUT)
    assert answer.keeps  # the retried decision evicts, so a recomputation would show
    before = info(a, session.id)
    with replicas.redis.client() as redis:
        [key] = [k for k in redis.scan_iter(match="kvevict:*") if session.id.encode() in k]
        stored = redis.get(key)
        assert b.ReportBlock(report, timeout=TIMEOUT).SerializeToString() == answer.SerializeToString()
        # Different content under a decided number is refused, not answered: decided once, and
        # a forged report cannot hand its decision to the real one.
        other, _ = session.build(8)
        assert other.SerializeToString() != report.SerializeToString()
        error = rpc_error(a.ReportBlock, other)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith("sequence: ")
        assert redis.get(key) == stored  # not even rewritten
    assert info(b, session.id).SerializeToString() == before.SerializeToString()
    session.apply(report, answer)

    for sequence in (report.sequence + 2, 1, 100):  # a gap, an old number, far ahead
        skipped, _ = session.build(4)
        skipped.sequence = sequence
        error = rpc_error(b.ReportBlock, skipped)
        assert error.code() == grpc.StatusCode.ABORTED
        # The session's position in its sequence stays out of the answer.
        assert error.details().startswith("sequence: ") and not any(c.isdigit() for c in error.details())
    assert info(a, session.id).SerializeToString() == before.SerializeToString()
    assert session.report(4).sequence == 3


def test_unknown_and_closed_sessions_are_not_found(replicas: Replicas) -> None:
    a, b = replicas.stubs
    session = remote_session([a, b], open_request("tova", budget=12))
    session.report(6)
    report, _ = session.build(2)
    for call, request in [(a.ReportBlock, renamed(report, "0" * 32)),
                          (b.GetSession, pb.GetSessionRequest(session_id="nope")),
                          (a.CloseSession, pb.CloseSessionRequest(session_id="nope"))]:
        assert rpc_error(call, request).code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(a.GetSession, pb.GetSessionRequest(session_id=""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("session_id: ")

    closed = b.CloseSession(pb.CloseSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert (closed.reports, closed.evicted_tokens) == (1, 0)
    assert rpc_error(a.ReportBlock, report).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(b.CloseSession, pb.CloseSessionRequest(session_id=session.id)).code() == grpc.StatusCode.NOT_FOUND
    with replicas.redis.client() as redis:
        assert not redis.exists(session_key(session.id))
        assert redis.zscore("kvevict:sessions", session.id) is None


def test_reports_over_grpcs_default_4_mib_pass(replicas: Replicas) -> None:
    """The servers' explicit 64 MiB limit, not gRPC's 4 MiB default, applies (a Llama-8B report
    is several MB)."""
    session = remote_session(replicas.stubs, open_request("tova", budget=64, num_layers=4, num_kv_heads=8, num_query_heads=8))
    report, _ = session.build(70_000, values=lambda layer, req, shape: np.zeros(shape))
    assert report.ByteSize() > 4 * 2**20
    answer = session.core.report_block(report)
    assert [k.kept_tokens for k in answer.keeps] == [64] * 4


def test_every_write_refreshes_the_session_ttl_in_redis(replicas: Replicas) -> None:
    session = remote_session(replicas.stubs, open_request("h2o", budget=12))
    key = session_key(session.id)
    with replicas.redis.client() as redis:
        assert 3590 < redis.ttl(key) <= 3600  # the default TTL
        redis.expire(key, 100)
        session.report(5)
        assert 3590 < redis.ttl(key) <= 3600
        redis.expire(key, 100)
        info(replicas.stubs[0], session.id)  # reads do not refresh
        assert redis.ttl(key) <= 100


@pytest.mark.parametrize("case", OPEN_CASES)
def test_bad_open_requests_are_invalid_argument_naming_the_field(replicas: Replicas, case: str) -> None:
    mutate, field = OPEN_CASES[case]
    request = open_request("h2o", budget=24)
    mutate(request)
    error = rpc_error(replicas.stubs[0].OpenSession, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")


@pytest.mark.parametrize("case", REPORT_CASES)
def test_bad_reports_are_invalid_argument_naming_the_field_and_change_nothing(replicas: Replicas, case: str) -> None:
    mutate, field = REPORT_CASES[case]
    a, b = replicas.stubs
    session = remote_session([a, b], open_request("h2o", "caote", budget=12, sink=1), seed=len(case))
    if mutate is not None:
        session.report(10)
        session.report(10)
    good, _ = session.build(4)
    bad = pb.ReportBlockRequest.FromString(good.SerializeToString())
    if mutate is None:
        bad.sequence = 0  # before any report: neither a retry nor the next one
    else:
        mutate(bad)
    before = info(a, session.id)
    error = rpc_error(b.ReportBlock, bad)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"{field}: "), error.details()
    assert info(b, session.id).SerializeToString() == before.SerializeToString()
    response = a.ReportBlock(good, timeout=TIMEOUT)  # the session goes on
    assert response.sequence == good.sequence
    if mutate is not None:
        assert response.evicted_tokens == 4 * 3 * 2


def test_racing_one_sequence_number_on_two_replicas_stores_exactly_one_decision(replicas: Replicas) -> None:
    """Two clients send the same sequence number with different statistics to different replicas
    at the same moment. Without an atomic read-modify-write both would decide and store, and the
    first answer would be overwritten; here exactly one is decided and stored (one of the two
    decisions an in-process core makes from the previous state), and the other request, no
    retry of the decided one, is refused FAILED_PRECONDITION, there and on a later try."""
    a, b = replicas.stubs
    request = open_request("h2o", "caote", budget=96, sink=1, num_layers=8, num_kv_heads=4, num_query_heads=8)
    session = remote_session([a], request, seed=11)
    reference = ManagerCore(InMemoryStateStore())
    ref_id = reference.open_session(request).session_id
    conflicts_before = sum(len(m.lines("event=store.conflict")) for m in replicas.processes)
    for round_ in range(6):
        first, _ = session.build(120 if round_ == 0 else 40)
        second, _ = session.build(120 if round_ == 0 else 40)  # same number, other statistics
        barrier = threading.Barrier(2)

        def send(stub, report):
            barrier.wait()
            try:
                return stub.ReportBlock(report, timeout=TIMEOUT)
            except grpc.RpcError as error:
                return error.code()

        with ThreadPoolExecutor(2) as pool:
            outcomes = [f.result() for f in [pool.submit(send, a, first), pool.submit(send, b, second)]]
        answered = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, pb.ReportBlockResponse)]
        assert len(answered) == 1, outcomes
        assert outcomes[1 - answered[0]] == grpc.StatusCode.FAILED_PRECONDITION
        answer = outcomes[answered[0]]
        candidates = [fork(reference, ref_id).report_block(renamed(r, ref_id)).SerializeToString() for r in (first, second)]
        assert candidates[0] != candidates[1]  # the two contents decide differently
        winner, loser = (first, second) if answered == [0] else (second, first)
        assert answer.SerializeToString() == candidates[answered[0]]
        reference.report_block(renamed(winner, ref_id))
        state = info(b, session.id)
        assert (state.reports, state.last_sequence) == (round_ + 1, first.sequence)
        assert a.ReportBlock(winner, timeout=TIMEOUT).SerializeToString() == answer.SerializeToString()
        assert rpc_error(b.ReportBlock, loser).code() == grpc.StatusCode.FAILED_PRECONDITION
        session.apply(winner, answer)
    conflicts = sum(len(m.lines("event=store.conflict")) for m in replicas.processes) - conflicts_before
    print(f"write conflicts resolved by optimistic retries: {conflicts} in 6 rounds")


def fork(core: ManagerCore, session_id: str) -> ManagerCore:
    """A separate in-process replica holding a copy of one session's current state."""
    replica = ManagerCore(InMemoryStateStore())
    replica.store.put(SessionState.from_bytes(core.store.get(session_id).to_bytes()))
    return replica


def test_health_is_serving_for_the_server_and_the_service(replicas: Replicas) -> None:
    with channel(replicas.processes[0].address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvevict.v1.CacheManagerService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_alone_is_enough_to_call_list_policies(replicas: Replicas) -> None:
    with channel(replicas.processes[1].address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        services = set(database.get_services())
        assert {"kvevict.v1.CacheManagerService", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(database)  # not the default pool: nothing compiled in
        service = pool.FindServiceByName("kvevict.v1.CacheManagerService")
        assert {m.name for m in service.methods} == {"OpenSession", "ReportBlock", "CloseSession", "GetSession", "ListPolicies"}
        method = service.FindMethodByName("ListPolicies")
        request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        assert request_class is not pb.ListPoliciesRequest
        call = ch.unary_unary(f"/{service.full_name}/{method.name}",
                              request_serializer=request_class.SerializeToString,
                              response_deserializer=response_class.FromString)
        answer = call(request_class(), timeout=TIMEOUT)
        assert answer.SerializeToString() == policies_response().SerializeToString()
        assert any(p.name == "snapkv" and any(o.name == "pool_kernel" for o in p.options) for p in answer.policies)


def test_reflection_v1_lists_the_services_and_resolves_their_files(replicas: Replicas) -> None:
    with channel(replicas.processes[0].address) as ch:
        check_reflection_v1(ch, "kvevict.v1.CacheManagerService",
                            {"OpenSession", "ReportBlock", "CloseSession", "GetSession", "ListPolicies"})
