"""Limits through real gRPC: the session limit is shared by the replicas of one Redis and answers
RESOURCE_EXHAUSTED, as does a message over the size limit; the servers keep serving and the
session that got the oversize report is unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from kvevict.v1 import cache_manager_pb2 as pb
from tests.servers import channel, manager_stub, start_managers
from tests.test_manager_service import TIMEOUT, info, remote_session, rpc_error
from tests.test_manager_support import open_request


@pytest.fixture(scope="module")
def limited(module_redis) -> Iterator[list]:
    """Two replicas of one Redis allowing 2 sessions in all and 1 MiB messages."""
    managers = start_managers(2, module_redis.url, "--max-sessions", "2", "--max-message-mb", "1")
    channels = [channel(m.address) for m in managers]
    try:
        yield [manager_stub(c) for c in channels]
    finally:
        for c in channels:
            c.close()
        for m in managers:
            m.kill()


def test_too_many_sessions_across_replicas_is_resource_exhausted(limited) -> None:
    a, b = limited
    request = open_request("tova", budget=12)
    first = a.OpenSession(request, timeout=TIMEOUT).session_id
    b.OpenSession(request, timeout=TIMEOUT)
    for stub in (a, b):  # the limit counts every replica's sessions
        error = rpc_error(stub.OpenSession, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions: " in error.details()
    b.CloseSession(pb.CloseSessionRequest(session_id=first), timeout=TIMEOUT)
    third = a.OpenSession(request, timeout=TIMEOUT).session_id  # room again
    a.CloseSession(pb.CloseSessionRequest(session_id=third), timeout=TIMEOUT)


def test_an_oversize_report_is_resource_exhausted_and_changes_nothing(limited) -> None:
    a, b = limited
    session = remote_session([a, b], open_request("h2o", budget=64), seed=1)
    try:
        session.report(40)
        before = info(a, session.id)
        # 3 layers x 2 heads x (40 + 200k) tokens x 2 bytes ~ 2.4 MB > 1 MiB.
        huge, _ = session.build(200_000, values=lambda layer, req, shape: np.zeros(shape))
        assert huge.ByteSize() > 2**20
        error = rpc_error(b.ReportBlock, huge)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info(b, session.id).SerializeToString() == before.SerializeToString()
        assert session.report(8).sequence == 2  # both replicas still serve the session
        assert session.report(8).evicted_tokens == 0  # 56 tokens, budget 64
    finally:
        a.CloseSession(pb.CloseSessionRequest(session_id=session.id), timeout=TIMEOUT)

