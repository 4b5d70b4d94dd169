"""Failure injection on a real manager process and a real redis-server: health follows Redis,
reports fail UNAVAILABLE while it is gone, and the session continues where it was once Redis is
back. Two kinds of outage, both keeping the data:
- a restart: `SAVE` a snapshot, terminate redis-server, start it again on the same port (it
  loads the snapshot). The tests run with `--save ""`, so without the explicit SAVE a restart
  would lose the sessions; with it, the restart is what a persistent production Redis does.
- a hang: SIGSTOP / SIGCONT. Connections are accepted but never answered, like a stalled Redis
  or a network partition; the manager's Redis timeout (0.5 s here) turns it into UNAVAILABLE.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvevict.cache_manager import InMemoryStateStore, ManagerCore
from kvevict.v1 import cache_manager_pb2 as pb
from tests.servers import channel, manager_stub, wait_until
from tests.test_manager_service import TIMEOUT, info, remote_session, renamed, rpc_error
from tests.test_manager_support import open_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def statuses(health) -> set[int]:
    return {health.Check(health_pb2.HealthCheckRequest(service=s), timeout=TIMEOUT).status
            for s in ("", "kvevict.v1.CacheManagerService")}


def wait_health(health, status: int) -> None:
    wait_until(lambda: statuses(health) == {status}, timeout_s=10, interval_s=0.1,
               what=health_pb2.HealthCheckResponse.ServingStatus.Name(status))


def test_health_follows_redis_and_a_session_survives_a_restart(redis_server, manager_factory) -> None:
    manager = manager_factory(redis_server.url, "--redis-timeout", "0.5")
    with channel(manager.address) as ch:
        stub, health = manager_stub(ch), health_pb2_grpc.HealthStub(ch)
        assert statuses(health) == {SERVING}
        session = remote_session([stub], open_request("h2o", "caote", budget=12, sink=1), seed=4)
        session.report(10)
        report, _ = session.build(6)

        redis_server.save()
        redis_server.stop()
        wait_health(health, NOT_SERVING)
        for call, request in [(stub.ReportBlock, report), (stub.GetSession, pb.GetSessionRequest(session_id=session.id)),
                              (stub.OpenSession, open_request("tova", budget=8))]:
            error = rpc_error(call, request)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details().startswith("redis ")
        assert manager.lines("event=health status=NOT_SERVING")

        redis_server.start()  # same port, loads the snapshot
        wait_health(health, SERVING)
        answer = stub.ReportBlock(report, timeout=TIMEOUT)  # the client's retry of the failed report
        session.apply(report, answer)
        assert (info(stub, session.id).reports, answer.evicted_tokens) == (2, 4 * 3 * 2)
        assert session.report(3).sequence == 3


def test_a_hung_redis_is_unavailable_and_the_session_continues_exactly(redis_server, manager_factory) -> None:
    manager = manager_factory(redis_server.url, "--redis-timeout", "0.5")
    request = open_request("h2o", "fastcaote", budget=12, sink=1)
    reference = ManagerCore(InMemoryStateStore())
    ref_id = reference.open_session(request).session_id
    with channel(manager.address) as ch:
        stub, health = manager_stub(ch), health_pb2_grpc.HealthStub(ch)
        session = remote_session([stub], request, seed=6)
        first, _ = session.build(10)
        session.apply(first, stub.ReportBlock(first, timeout=TIMEOUT))
        reference.report_block(renamed(first, ref_id))
        report, _ = session.build(7)

        redis_server.pause()
        try:
            error = rpc_error(stub.ReportBlock, report)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "Timeout" in error.details()
            wait_health(health, NOT_SERVING)
        finally:
            redis_server.resume()
        wait_health(health, SERVING)
        answer = stub.ReportBlock(report, timeout=TIMEOUT)
        expected = reference.report_block(renamed(report, ref_id))
        assert answer.SerializeToString() == expected.SerializeToString()
        assert info(stub, session.id).reports == 2
    assert manager.process.poll() is None  # served throughout


def test_sigterm_stops_the_server_gracefully(manager_factory) -> None:
    manager = manager_factory()  # memory://
    with channel(manager.address) as ch:
        stub = manager_stub(ch)
        session = stub.OpenSession(open_request("tova", budget=8), timeout=TIMEOUT)
        assert stub.GetSession(pb.GetSessionRequest(session_id=session.session_id), timeout=TIMEOUT).reports == 0
    assert manager.stop(signal.SIGTERM, timeout_s=20) == 0
    assert manager.lines("event=manager.stopping") and manager.lines("event=manager.stopped")
    with channel(manager.address) as ch:
        error = rpc_error(manager_stub(ch).ListPolicies, pb.ListPoliciesRequest())
        assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_memory_store_sessions_expire_after_the_ttl(manager_factory) -> None:
    manager = manager_factory("memory://", "--session-ttl", "1")
    with channel(manager.address) as ch:
        stub = manager_stub(ch)
        session = remote_session([stub], open_request("tova", budget=8))
        session.report(4)

        def expired() -> bool:
            try:
                stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        wait_until(expired, timeout_s=5, interval_s=0.2, what="the session to expire")


def test_a_taken_port_is_an_error_not_a_second_listener(manager_factory) -> None:
    manager = manager_factory()
    result = subprocess.run([sys.executable, "-m", "kvevict.cli", "manager", "serve", "--port", str(manager.port)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1:" in result.stderr
