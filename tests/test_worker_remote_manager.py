"""The worker's gRPC manager client: retries are idempotent, a lost manager fails open to the
same decisions, and manager errors come back as the domain's errors."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
import torch

from kvevict.cache_manager.errors import InvalidArgument, ManagerError, NotFound
from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import model_from_config
from kvevict.worker.remote_manager import ManagerUnavailable, RemoteManagerClient
from tests.tiny_models import tiny_config

PROMPT = torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(3))


class FlakyManager(pb_grpc.CacheManagerServiceServicer):
    """ManagerCore behind gRPC, answering UNAVAILABLE to chosen ReportBlock calls: before
    deciding (nothing stored) or after deciding (the decision is stored, the answer lost)."""

    def __init__(self, fail_before: set[int] = frozenset(), fail_after: set[int] = frozenset()) -> None:
        self.core = ManagerCore(InMemoryStateStore())
        self.fail_before, self.fail_after = fail_before, fail_after
        self.report_calls = 0

    def OpenSession(self, request, context):
        return self._run(self.core.open_session, request, context)

    def CloseSession(self, request, context):
        return self._run(self.core.close_session, request, context)

    def ReportBlock(self, request, context):
        self.report_calls += 1
        if self.report_calls in self.fail_before:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected before deciding")
        response = self._run(self.core.report_block, request, context)
        if self.report_calls in self.fail_after:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected after deciding")
        return response

    @staticmethod
    def _run(handler, request, context):
        try:
            return handler(request)
        except InvalidArgument as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except NotFound as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_CacheManagerServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", server

    yield start
    for server in servers:
        server.stop(0)


def _settings(base="tova", wrapper="caote", fail_open=True) -> EvictionSettings:
    return EvictionSettings(policy=pb.PolicySpec(base=base, wrapper=wrapper), budget=pb.BudgetSpec(tokens=20),
                            block_size=8, fail_open=fail_open)


def _generate(manager, settings, **kwargs):
    model = model_from_config(tiny_config("llama"), seed=5)
    return EvictingGenerator(model, manager, settings).generate(PROMPT, 30, **kwargs)


def test_retried_reports_give_the_decisions_of_an_uninterrupted_session(serve):
    flaky = FlakyManager(fail_before={2, 5}, fail_after={3, 7})
    address, _ = serve(flaky)
    client = RemoteManagerClient(address, timeout_s=5, retries=3, backoff_s=0.01)
    result = _generate(client, _settings("h2o"))
    expected = _generate(EmbeddedManagerClient(), _settings("h2o"))
    assert client.retries_made == 4
    assert not result.summary.manager_fallback
    assert result.token_ids == expected.token_ids
    assert result.summary.evicted_per_layer == expected.summary.evicted_per_layer


def test_a_manager_lost_mid_generation_fails_open_to_the_same_policy_in_process(serve):
    address, server = serve(FlakyManager())
    client = RemoteManagerClient(address, timeout_s=1, retries=1, backoff_s=0.01)
    tokens_seen = []

    def kill_after_ten(token: int) -> None:
        tokens_seen.append(token)
        if len(tokens_seen) == 10:
            server.stop(0)

    result = _generate(client, _settings("tova"), on_token=kill_after_ten)
    expected = _generate(EmbeddedManagerClient(), _settings("tova"))
    assert result.summary.manager_fallback
    # TOVA keeps no state beyond the cache, so the in-process manager decides exactly the same.
    assert result.token_ids == expected.token_ids
    assert result.summary.final_lengths == expected.summary.final_lengths


def test_an_unreachable_manager_at_open_fails_open_or_fails_the_request():
    unreachable = RemoteManagerClient("127.0.0.1:1", timeout_s=0.5, retries=1, backoff_s=0.01)
    assert _generate(unreachable, _settings()).summary.manager_fallback
    with pytest.raises(ManagerUnavailable):
        _generate(unreachable, _settings(fail_open=False))


def test_a_manager_lost_mid_generation_fails_the_request_when_fail_open_is_off(serve):
    address, server = serve(FlakyManager())
    client = RemoteManagerClient(address, timeout_s=1, retries=1, backoff_s=0.01)

    def stop_manager(token: int) -> None:
        server.stop(0)

    with pytest.raises(ManagerUnavailable):
        _generate(client, _settings(fail_open=False), on_token=stop_manager)


def test_invalid_settings_come_back_as_invalid_argument_naming_the_field(serve):
    address, _ = serve(FlakyManager())
    client = RemoteManagerClient(address, timeout_s=5, retries=0)
    with pytest.raises(InvalidArgument) as error:
        _generate(client, _settings(base="nope"))
    assert error.value.field == "policy.base"
    assert isinstance(error.value, ManagerError)
