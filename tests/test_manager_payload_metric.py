"""The manager's payload histogram counts each ReportBlock's bytes as received, through a real
`kvevict manager serve` (the size comes from the decoded bytes, not a second walk of the message)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc
from tests.metrics_support import scrape
from tests.servers import channel, start_manager
from tests.test_manager_support import Session, open_request
from tests.test_metrics_services import RemoteCore

PAYLOAD = "kvevict_manager_report_payload_bytes"


def test_payload_bytes_sum_to_the_serialized_reports_decided_and_refused():
    with start_manager() as manager, channel(manager.address) as ch:
        stub = pb_grpc.CacheManagerServiceStub(ch)
        opened = stub.OpenSession(open_request("h2o", "caote", budget=12), timeout=30)
        session = Session(RemoteCore(stub), opened, np.random.default_rng(0))
        before = scrape(manager.metrics_port)
        sizes = []
        for new in (16, 8, 8):
            request, _ = session.build(new)
            sizes.append(request.ByteSize())
            session.apply(request, stub.ReportBlock(request, timeout=30))
        # A refused one (out of order) is counted with its size too.
        late, _ = session.build(4)
        late.sequence += 5
        sizes.append(late.ByteSize())
        with pytest.raises(grpc.RpcError) as refused:
            stub.ReportBlock(late, timeout=30)
        assert refused.value.code() == grpc.StatusCode.ABORTED
        after = scrape(manager.metrics_port)
    assert after.value(f"{PAYLOAD}_count") - before.value(f"{PAYLOAD}_count") == len(sizes)
    assert after.value(f"{PAYLOAD}_sum") - before.value(f"{PAYLOAD}_sum") == sum(sizes)
