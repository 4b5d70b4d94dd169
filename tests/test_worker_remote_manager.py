"""The worker's gRPC manager client: retries are idempotent and last a time budget, a lost or
overloaded manager fails open to the same decisions, refused credentials fail loudly, manager
errors come back as the domain's errors, and the summary's manager_seconds is every second
spent on manager calls."""

from __future__ import annotations

import datetime
import ipaddress
import functools
import logging
import time
from concurrent import futures

import grpc
import pytest
import torch

from kvevict.cache_manager.errors import InvalidArgument, ManagerError, NotFound, ResourceExhausted
from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import geometry_of, model_from_config
from kvevict.worker.remote_manager import DOWN_OPEN_BUDGET_S, ManagerAuthError, ManagerUnavailable, RemoteManagerClient
from kvevict.worker.server import _status_of
from tests.servers import free_port, start_manager
from tests.tiny_models import tiny_config

PROMPT = torch.randint(3, 97, (60,), generator=torch.Generator().manual_seed(3))


class FlakyManager(pb_grpc.CacheManagerServiceServicer):
    """ManagerCore behind gRPC, answering UNAVAILABLE to chosen ReportBlock calls: before
    deciding (nothing stored) or after deciding (the decision is stored, the answer lost); and
    to the first `open_failures` OpenSession and `close_failures` CloseSession calls. Every
    injected failure comes `failure_delay_s` after the call arrived."""

    def __init__(self, fail_before: set[int] = frozenset(), fail_after: set[int] = frozenset(),
                 open_failures: int = 0, close_failures: int = 0, failure_delay_s: float = 0.0) -> None:
        self.core = ManagerCore(InMemoryStateStore())
        self.fail_before, self.fail_after = fail_before, fail_after
        self.open_failures, self.close_failures = open_failures, close_failures
        self.failure_delay_s = failure_delay_s
        self.report_calls = self.open_calls = self.close_calls = 0

    def OpenSession(self, request, context):
        self.open_calls += 1
        if self.open_calls <= self.open_failures:
            self._fail(context, "injected at open")
        return self._run(self.core.open_session, request, context)

    def CloseSession(self, request, context):
        self.close_calls += 1
        if self.close_calls <= self.close_failures:
            self._fail(context, "injected at close")
        return self._run(self.core.close_session, request, context)

    def ReportBlock(self, request, context):
        self.report_calls += 1
        if self.report_calls in self.fail_before:
            self._fail(context, "injected before deciding")
        response = self._run(self.core.report_block, request, context)
        if self.report_calls in self.fail_after:
            self._fail(context, "injected after deciding")
        return response

    def _fail(self, context, details: str) -> None:
        time.sleep(self.failure_delay_s)
        context.abort(grpc.StatusCode.UNAVAILABLE, details)

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


# -- the retry budget -----------------------------------------------------------------------
EARLY = 0.02  # gRPC's deadlines run on the wall clock, ours on time.monotonic()


@functools.cache
def _open_request() -> pb.OpenSessionRequest:
    geometry = geometry_of(model_from_config(tiny_config("llama"), seed=5))
    return pb.OpenSessionRequest(geometry=geometry, policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=20),
                                 block_size=8)


def _timed_failure(client: RemoteManagerClient) -> float:
    """Seconds until an OpenSession gives up with ManagerUnavailable."""
    request = _open_request()
    started = time.monotonic()
    try:
        with pytest.raises(ManagerUnavailable):
            client.open_session(request)
    finally:
        client.close()
    return time.monotonic() - started


def test_an_unreachable_manager_is_retried_for_the_whole_budget_then_unavailable():
    client = RemoteManagerClient(f"127.0.0.1:{free_port()}", timeout_s=0.3, retry_budget_s=1.2)
    elapsed = _timed_failure(client)
    # Every attempt waits for the channel for its whole deadline: 4 of 0.3 s fill the budget.
    assert 1.2 - EARLY <= elapsed < 1.2 + 0.5
    assert client.retries_made == 3


def test_each_attempt_is_cut_to_what_is_left_of_the_budget():
    client = RemoteManagerClient(f"127.0.0.1:{free_port()}", timeout_s=30, retry_budget_s=0.6)
    elapsed = _timed_failure(client)
    assert 0.6 - EARLY <= elapsed < 0.6 + 0.5
    assert client.retries_made == 0


def test_retries_when_given_cap_the_attempts_within_the_budget():
    client = RemoteManagerClient(f"127.0.0.1:{free_port()}", timeout_s=0.2, retries=1, retry_budget_s=30)
    elapsed = _timed_failure(client)
    assert 0.4 - EARLY <= elapsed < 0.4 + 0.5
    assert client.retries_made == 1


class Recovering(FlakyManager):
    """Answers UNAVAILABLE at once (as a manager whose Redis is down) until `until`."""

    def __init__(self, until: float) -> None:
        super().__init__()
        self.until = until

    def OpenSession(self, request, context):
        if time.monotonic() < self.until:
            context.abort(grpc.StatusCode.UNAVAILABLE, "redis unavailable")
        return super().OpenSession(request, context)


def test_a_manager_answering_unavailable_is_retried_until_it_recovers(serve):
    outage_s = 1.5
    address, _ = serve(Recovering(until=time.monotonic() + outage_s))
    client = RemoteManagerClient(address)  # defaults: 15 s budget, backoff capped at 1 s
    request = _open_request()
    started = time.monotonic()
    assert client.open_session(request).session_id
    elapsed = time.monotonic() - started
    client.close()
    assert client.retries_made >= 3
    # The backoff is capped at 1 s: the first attempt after the recovery comes within it.
    assert outage_s <= elapsed < outage_s + 1.0 + 0.5


@pytest.mark.parametrize("kwargs, option", [
    (dict(retry_budget_s=0), "retry_budget_s"), (dict(retry_budget_s=-1.0), "retry_budget_s"),
    (dict(timeout_s=0), "timeout_s"), (dict(max_backoff_s=0), "max_backoff_s"), (dict(retries=-1), "retries"),
    (dict(token=""), "token"), (dict(token="a\nb"), "token"), (dict(token=" padded"), "token"),
])
def test_bad_client_options_are_errors_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        RemoteManagerClient("127.0.0.1:1", **kwargs)


# -- credentials ----------------------------------------------------------------------------
class GuardedManager(FlakyManager):
    """FlakyManager that wants `authorization: Bearer <token>`: none or another token is
    UNAUTHENTICATED, a `denied` one PERMISSION_DENIED (as kvevict.auth answers)."""

    def __init__(self, token: str, denied: str | None = None) -> None:
        super().__init__()
        self.token, self.denied = token, denied
        self.refused = 0

    def _check(self, context) -> None:
        sent = dict(context.invocation_metadata()).get("authorization")
        if self.denied is not None and sent == f"Bearer {self.denied}":
            self.refused += 1
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "client 'other' is not allowed")
        if sent != f"Bearer {self.token}":
            self.refused += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token")

    def OpenSession(self, request, context):
        self._check(context)
        return super().OpenSession(request, context)

    def ReportBlock(self, request, context):
        self._check(context)
        return super().ReportBlock(request, context)

    def CloseSession(self, request, context):
        self._check(context)
        return super().CloseSession(request, context)


TOKEN = "s3cret-token-0123456789"


def test_the_token_goes_with_every_call(serve):
    guarded = GuardedManager(TOKEN)
    address, _ = serve(guarded)
    result = _generate(RemoteManagerClient(address, token=TOKEN), _settings("h2o"))
    assert guarded.refused == 0 and guarded.report_calls == result.summary.reports > 0
    assert guarded.close_calls == 1
    assert not result.summary.manager_fallback
    assert result.token_ids == _generate(EmbeddedManagerClient(), _settings("h2o")).token_ids


@pytest.mark.parametrize("token, code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                         ("wrong-token-0123456789", grpc.StatusCode.UNAUTHENTICATED),
                                         ("denied-token-0123456789", grpc.StatusCode.PERMISSION_DENIED)])
def test_refused_credentials_are_neither_retried_nor_a_fallback(serve, token, code):
    guarded = GuardedManager(TOKEN, denied="denied-token-0123456789")
    address, _ = serve(guarded)
    client = RemoteManagerClient(address, token=token)
    with pytest.raises(ManagerAuthError) as error:
        _generate(client, _settings(fail_open=True))
    assert error.value.code == code
    assert client.retries_made == 0 and guarded.refused == 1
    assert "refused the worker's credentials" in str(error.value) and code.name in str(error.value)
    # What the worker's client is told: the credentials, not an internal error.
    status, details = _status_of(error.value)
    assert status != grpc.StatusCode.INTERNAL and "credentials" in details


def _self_signed() -> tuple[bytes, bytes]:
    """(certificate, key) PEM for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvevict-manager")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_credentials_make_the_channel_tls():
    cert, key = _self_signed()
    guarded = GuardedManager(TOKEN)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CacheManagerServiceServicer_to_server(guarded, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        tls = RemoteManagerClient(f"127.0.0.1:{port}", credentials=grpc.ssl_channel_credentials(cert), token=TOKEN)
        result = _generate(tls, _settings("h2o"))
        assert not result.summary.manager_fallback and guarded.report_calls == result.summary.reports
        # A plaintext client cannot talk to it: no TLS handshake, no answer within the budget.
        plaintext = RemoteManagerClient(f"127.0.0.1:{port}", timeout_s=0.3, retry_budget_s=0.6, token=TOKEN)
        _timed_failure(plaintext)
    finally:
        server.stop(0)


# -- manager_seconds --------------------------------------------------------------------------
def test_manager_seconds_counts_failed_calls_and_retry_waits(serve):
    delay = 0.25
    flaky = FlakyManager(fail_before={2}, open_failures=2, close_failures=1, failure_delay_s=delay)
    address, _ = serve(flaky)
    client = RemoteManagerClient(address, backoff_s=0.01)
    result = _generate(client, _settings("h2o"), keep_session=True)
    assert client.retries_made == 3 and not result.summary.manager_fallback
    # Two failed opens and one failed report, each answered `delay` after it was sent.
    assert result.summary.manager_seconds >= 3 * delay - EARLY
    session = result.session
    before_close = session.stats.manager_seconds
    session.close()
    assert flaky.close_calls == 2
    assert session.stats.manager_seconds - before_close >= delay - EARLY


def test_manager_seconds_counts_the_wait_for_an_unreachable_manager():
    client = RemoteManagerClient(f"127.0.0.1:{free_port()}", timeout_s=0.3, retry_budget_s=0.9)
    result = _generate(client, _settings())
    assert result.summary.manager_fallback
    assert result.summary.manager_seconds >= 0.9 - EARLY  # the open waited the whole budget, then fell back


def test_a_request_failed_for_an_unreachable_manager_does_not_wait_again_to_close(serve):
    address, server = serve(FlakyManager())
    client = RemoteManagerClient(address, timeout_s=0.3, retry_budget_s=1.0)
    stopped_at = []

    def stop_manager(token: int) -> None:
        if not stopped_at:
            server.stop(0)
            stopped_at.append(time.monotonic())

    with pytest.raises(ManagerUnavailable):
        _generate(client, _settings(fail_open=False), on_token=stop_manager)
    assert time.monotonic() - stopped_at[0] < 1.0 + 0.8  # one budget, for the report, none for the close


# -- fail-open when the manager refuses ------------------------------------------------------
@pytest.fixture
def manager_process():
    started = []

    def start(*flags: str):
        started.append(start_manager("memory://", *flags))
        return started[-1]

    yield start
    for manager in started:
        manager.kill()


def _slot_is_free(address: str) -> bool:
    """Whether a manager at --max-sessions 1 takes a session now (closed again at once)."""
    client = RemoteManagerClient(address)
    try:
        opened = client.open_session(_open_request())
        client.close_session(pb.CloseSessionRequest(session_id=opened.session_id))
        return True
    except ResourceExhausted:
        return False
    finally:
        client.close()


def test_a_manager_refusing_the_session_for_load_fails_open_or_fails_the_request(manager_process, caplog):
    manager = manager_process("--max-sessions", "1")
    holder = RemoteManagerClient(manager.address)
    holder.open_session(_open_request())  # the only session the manager allows
    client = RemoteManagerClient(manager.address)
    with caplog.at_level(logging.WARNING, logger="kvevict.worker.cache_session"):
        result = _generate(client, _settings("h2o"))
    assert result.summary.manager_fallback
    assert "reason=overloaded" in caplog.text
    assert result.token_ids == _generate(EmbeddedManagerClient(), _settings("h2o")).token_ids
    assert client.retries_made == 0  # a refusal is not retried
    with pytest.raises(ResourceExhausted):
        _generate(client, _settings("h2o", fail_open=False))
    holder.close()
    client.close()


def test_a_report_refused_for_load_fails_open_and_gives_the_session_back(manager_process):
    # The open's messages fit under the limit; every report (about 1 KiB here) is over it.
    manager = manager_process("--max-sessions", "1", "--max-message-mb", str(512 / 2**20))
    client = RemoteManagerClient(manager.address)
    result = _generate(client, _settings("tova"))
    assert result.summary.manager_fallback
    assert result.token_ids == _generate(EmbeddedManagerClient(), _settings("tova")).token_ids
    # The abandoned session was closed: the one slot is free again, long before any TTL.
    assert _slot_is_free(manager.address)
    with pytest.raises(ResourceExhausted, match="larger than max"):  # the report, not the open
        _generate(client, _settings("tova", fail_open=False))
    client.close()


class CorruptReport:
    """A ManagerClient that sends the `at`-th report with an invalid phase (a worker's bug or a
    manager that disagrees), and everything else as is."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.reports = inner, at, 0

    def open_session(self, request):
        return self.inner.open_session(request)

    def report_block(self, request):
        self.reports += 1
        if self.reports == self.at:
            bad = pb.ReportBlockRequest()
            bad.CopyFrom(request)
            bad.phase = 99
            return self.inner.report_block(bad)
        return self.inner.report_block(request)

    def close_session(self, request):
        return self.inner.close_session(request)


def test_a_report_the_manager_rejects_fails_open_with_a_warning(manager_process, caplog):
    manager = manager_process("--max-sessions", "1")
    client = RemoteManagerClient(manager.address)
    with caplog.at_level(logging.WARNING, logger="kvevict.worker.cache_session"):
        result = _generate(CorruptReport(client, at=3), _settings("tova"))
    assert result.summary.manager_fallback
    assert "reason=rejected_report" in caplog.text and "phase" in caplog.text
    assert result.token_ids == _generate(EmbeddedManagerClient(), _settings("tova")).token_ids
    assert _slot_is_free(manager.address)  # the rejected session was given back
    with pytest.raises(InvalidArgument) as error:
        _generate(CorruptReport(client, at=3), _settings("tova", fail_open=False))
    assert error.value.field == "phase"
    client.close()


def test_after_a_spent_budget_new_sessions_fall_back_at_once_and_open_ones_keep_the_budget():
    """An outage makes the first call wait its whole budget; new sessions then wait only
    DOWN_OPEN_BUDGET_S (so every new request does not stall the full budget before falling
    back), reports of open sessions still the whole budget (what rides out a restart), and
    the first answered call after the manager's return ends it."""
    port = free_port()
    client = RemoteManagerClient(f"127.0.0.1:{port}", timeout_s=0.5, retry_budget_s=2.5)
    request = pb.OpenSessionRequest(geometry=pb.ModelGeometry(num_layers=1, num_kv_heads=1, num_query_heads=1,
                                                              head_dim=8),
                                  policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=8), block_size=4)

    def waited(call, message) -> float:
        started = time.monotonic()
        with pytest.raises(ManagerUnavailable):
            call(message)
        return time.monotonic() - started

    try:
        assert not client.unreachable
        assert 2.3 <= waited(client.open_session, request) <= 3.5
        assert client.unreachable
        assert waited(client.open_session, request) <= DOWN_OPEN_BUDGET_S + 0.5
        assert 2.3 <= waited(client.report_block, pb.ReportBlockRequest(session_id="0" * 32, sequence=1)) <= 3.5
        manager = start_manager("memory://", "--port", str(port))
        try:
            opened = client.open_session(request)  # within the short wait or, once answered, as before
            assert opened.session_id and not client.unreachable
        finally:
            manager.kill()
    finally:
        client.close()
