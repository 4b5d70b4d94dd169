"""Identity on both services, with real processes and certificates made at test time.

Tokens: a call without one or with a wrong one is UNAUTHENTICATED (health stays open); a session
belongs to the client that opened it, and every other client is told NOT_FOUND, exactly as for
an id that never existed, while the owner's session goes on untouched. Mutual TLS: plaintext,
no certificate and another CA's certificate cannot connect, a certificate outside the allowed
names is PERMISSION_DENIED, and the certificate's name owns the sessions. Per-client quotas,
the state cap, undecodable requests, no session id in the logs, and a worker that reaches its
manager over mutual TLS with a token while serving its own clients over TLS with tokens (their
conversations their own).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvevict.auth import Authenticator, load_tokens
from kvevict.logs import RateLimitedLog, session_ref
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from tests.certificates import Pki
from tests.checkpoints import TEXT, save_tiny_checkpoint
from tests.servers import start_manager
from tests.test_manager_support import Session, open_request
from tests.test_worker_service import WORKER_READY, start_workers, worker_argv

TIMEOUT = 30
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}


def bearer(name: str | None) -> tuple[tuple[str, str], ...]:
    return () if name is None else (("authorization", f"Bearer {TOKENS[name]}"),)


def write_tokens(directory: Path) -> str:
    path = directory / "tokens"
    path.write_text("# client token\n" + "".join(f"{name} {token}\n" for name, token in TOKENS.items()))
    return str(path)


class As:
    """A manager stub whose every call presents `metadata` (duck-types the core for Session)."""

    def __init__(self, stub, metadata=()) -> None:
        self.stub, self.metadata = stub, metadata

    def __getattr__(self, method: str):
        call = getattr(self.stub, method)
        return lambda request: call(request, timeout=TIMEOUT, metadata=self.metadata)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self.ReportBlock(request)


def code_of(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(request)
    return raised.value.code(), raised.value.details()


def session_of(client: As, request: pb.OpenSessionRequest, seed: int = 0) -> Session:
    geometry = request.geometry
    return Session(client, client.OpenSession(request), np.random.default_rng(seed),
                   num_layers=geometry.num_layers, heads=geometry.num_kv_heads)


# -- units ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("alice short\n", "tokens:1: token shorter than 16"),
    ("alice a-long-enough-token-1\nalice a-long-enough-token-2\n", "tokens:2: client 'alice' listed twice"),
    ("alice a-long-enough-token-1\nbob a-long-enough-token-1\n", "tokens:2: the same token is listed for two"),
    ("# only a comment\n", "lists no token"),
    ("alice\n", "tokens:1: expected `<client-name> <token>`"),
    ("al/ce a-long-enough-token-1\n", "tokens:1: client name must be"),
])
def test_a_bad_tokens_file_is_refused_naming_the_line(tmp_path, text, message) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_tokens(str(path))


def test_only_token_digests_are_kept_and_a_certificate_allowlist_needs_mutual_tls() -> None:
    authenticator = Authenticator(TOKENS)
    assert not any(token in repr(vars(authenticator)) for token in TOKENS.values())
    with pytest.raises(ValueError, match="mutual TLS"):
        Authenticator(allowed_clients=["alice"])


def test_refusals_are_rate_limited_and_the_dropped_count_reported(caplog) -> None:
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("kvevict.test.ratelimit"), burst=3, interval_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="kvevict.test.ratelimit"):
        written = [limited.event(logging.INFO, "rpc.error", n=i) for i in range(50)]
        assert written == [True] * 3 + [False] * 47
        assert limited.event(logging.INFO, "other.event")  # each event has its own budget
        now[0] = 10.0
        assert limited.event(logging.INFO, "rpc.error", n=50)
    lines = [r.getMessage() for r in caplog.records if "rpc.error" in r.getMessage()]
    assert len(lines) == 4 and lines[-1].endswith("suppressed=47")


# -- the manager with tokens --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_manager(tmp_path_factory):
    tokens = write_tokens(tmp_path_factory.mktemp("tokens"))
    manager = start_manager("memory://", "--auth-tokens", tokens, "--max-sessions-per-client", "2",
                            "--max-session-mb", "1")
    channel = grpc.insecure_channel(manager.address)
    yield manager, pb_grpc.CacheManagerServiceStub(channel), channel
    channel.close()
    manager.kill()


def test_calls_without_a_valid_token_are_unauthenticated_but_health_is_open(token_manager) -> None:
    _, stub, channel = token_manager
    for metadata in ((), (("authorization", "Bearer not-a-token-of-anyone"),), (("authorization", TOKENS["alice"]),)):
        client = As(stub, metadata)
        for call, request in ((client.ListPolicies, pb.ListPoliciesRequest()),
                              (client.OpenSession, open_request("tova", budget=8)),
                              (client.GetSession, pb.GetSessionRequest(session_id="0" * 32))):
            code, details = code_of(call, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert "credentials" in details
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_another_client_cannot_see_steer_or_close_a_session(token_manager) -> None:
    manager, stub, _ = token_manager
    alice, bob = As(stub, bearer("alice")), As(stub, bearer("bob"))
    session = session_of(alice, open_request("h2o", "caote", budget=12, sink=1), seed=4)
    session.report(16)
    before = alice.GetSession(pb.GetSessionRequest(session_id=session.id))
    forged, _ = session.build(8)
    unknown = pb.GetSessionRequest(session_id="f" * 32)
    expected = code_of(bob.GetSession, unknown)
    assert expected[0] == grpc.StatusCode.NOT_FOUND
    # Every call on alice's session, by bob, is answered as for an id that never existed.
    for call, request in ((bob.GetSession, pb.GetSessionRequest(session_id=session.id)),
                          (bob.ReportBlock, forged),
                          (bob.CloseSession, pb.CloseSessionRequest(session_id=session.id))):
        code, details = code_of(call, request)
        assert code == grpc.StatusCode.NOT_FOUND
        assert details == expected[1]
    after = alice.GetSession(pb.GetSessionRequest(session_id=session.id))
    assert after.SerializeToString() == before.SerializeToString()
    # The forged report decided nothing: alice's own report with that number is decided now.
    response = alice.ReportBlock(forged)
    session.apply(forged, response)
    assert alice.GetSession(pb.GetSessionRequest(session_id=session.id)).reports == before.reports + 1
    alice.CloseSession(pb.CloseSessionRequest(session_id=session.id))
    # Nothing at info level names a session by its id.
    assert session.id not in manager.output
    assert f"session_ref={session_ref(session.id)}" in manager.output


def test_the_session_quota_is_per_client(token_manager) -> None:
    _, stub, _ = token_manager
    alice, bob = As(stub, bearer("alice")), As(stub, bearer("bob"))
    request = open_request("tova", budget=8)
    opened = [alice.OpenSession(request).session_id for _ in range(2)]
    code, details = code_of(alice.OpenSession, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("max_sessions_per_client: ")
    bob_session = bob.OpenSession(request).session_id  # bob's own quota is untouched
    for session_id in opened:
        alice.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    alice.CloseSession(pb.CloseSessionRequest(session_id=alice.OpenSession(request).session_id))
    bob.CloseSession(pb.CloseSessionRequest(session_id=bob_session))


def test_a_budget_beyond_the_state_cap_is_refused_naming_it(token_manager) -> None:
    _, stub, _ = token_manager
    alice = As(stub, bearer("alice"))
    # 1 MiB cap: 40k tokens x 4 heads x 2 layers x 8 bytes (positions + H2O sums) is 2.5 MiB.
    code, details = code_of(alice.OpenSession, open_request("h2o", budget=40_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("budget.tokens: ") and "max_session_bytes" in details
    alice.CloseSession(pb.CloseSessionRequest(session_id=alice.OpenSession(open_request("h2o", budget=64)).session_id))


def test_undecodable_requests_are_invalid_argument_after_authentication(token_manager) -> None:
    _, _, channel = token_manager
    raw = channel.unary_unary("/kvevict.v1.CacheManagerService/ReportBlock")
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x12\x05abc"):
        with pytest.raises(grpc.RpcError) as raised:
            raw(garbage, timeout=TIMEOUT, metadata=bearer("alice"))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "request: not a valid kvevict.v1.ReportBlockRequest message"
        with pytest.raises(grpc.RpcError) as raised:
            raw(garbage, timeout=TIMEOUT)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


# -- the manager with mutual TLS ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    return Pki(directory), Pki(directory / "other", name="another CA")


@pytest.fixture(scope="module")
def mtls_manager(pki):
    ca, _ = pki
    server = ca.issue("manager", server=True)
    manager = start_manager("memory://", "--tls-cert", server.cert, "--tls-key", server.key,
                            "--tls-client-ca", ca.ca, "--tls-allowed-clients", "alice,bob,worker")
    yield manager
    manager.kill()


def tls_stub(address: str, ca: str, client=None, stack=None):
    root = Path(ca).read_bytes()
    pair = {} if client is None else {"private_key": Path(client.key).read_bytes(),
                                      "certificate_chain": Path(client.cert).read_bytes()}
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root, **pair))
    if stack is not None:
        stack.append(channel)
    return pb_grpc.CacheManagerServiceStub(channel)


def test_mutual_tls_admits_only_allowed_certificates_and_their_names_own_sessions(mtls_manager, pki) -> None:
    ca, other_ca = pki
    channels: list[grpc.Channel] = []
    try:
        request = pb.ListPoliciesRequest()
        plaintext = pb_grpc.CacheManagerServiceStub(grpc.insecure_channel(mtls_manager.address))
        no_certificate = tls_stub(mtls_manager.address, ca.ca, stack=channels)
        foreign = tls_stub(mtls_manager.address, ca.ca, other_ca.issue("alice"), stack=channels)
        for stub in (plaintext, no_certificate, foreign):  # the handshake fails: nothing is served
            assert code_of(As(stub).ListPolicies, request)[0] == grpc.StatusCode.UNAVAILABLE
        mallory = As(tls_stub(mtls_manager.address, ca.ca, ca.issue("mallory"), stack=channels))
        code, details = code_of(mallory.ListPolicies, request)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "not allowed" in details
        alice = As(tls_stub(mtls_manager.address, ca.ca, ca.issue("alice"), stack=channels))
        bob = As(tls_stub(mtls_manager.address, ca.ca, ca.issue("bob"), stack=channels))
        session = session_of(alice, open_request("tova", budget=8))
        session.report(12)
        assert code_of(bob.GetSession, pb.GetSessionRequest(session_id=session.id))[0] == grpc.StatusCode.NOT_FOUND
        assert alice.GetSession(pb.GetSessionRequest(session_id=session.id)).reports == 1
        alice.CloseSession(pb.CloseSessionRequest(session_id=session.id))
    finally:
        for channel in channels:
            channel.close()


# -- a worker on both sides ---------------------------------------------------------------------------
def test_a_worker_serves_tls_clients_with_tokens_and_reaches_its_manager_over_mutual_tls(
        mtls_manager, pki, tmp_path) -> None:
    ca, _ = pki
    worker_cert, worker_client = ca.issue("worker-server", server=True), ca.issue("worker")
    tokens = write_tokens(tmp_path)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", seed=5)
    (worker,) = start_workers(worker_argv(
        checkpoint, "--manager", mtls_manager.address, "--manager-tls-ca", ca.ca,
        "--manager-tls-cert", worker_client.cert, "--manager-tls-key", worker_client.key, "--no-fail-open",
        "--tls-cert", worker_cert.cert, "--tls-key", worker_cert.key, "--auth-tokens", tokens))
    channel = grpc.secure_channel(f"127.0.0.1:{worker.match.group(1)}",
                                  grpc.ssl_channel_credentials(root_certificates=Path(ca.ca).read_bytes()))
    stub = worker_pb2_grpc.WorkerServiceStub(channel)
    eviction = worker_pb2.EvictionOptions(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=16),
                                          block_size=8)
    try:
        request = worker_pb2.GenerateRequest(text=TEXT * 2, max_new_tokens=4, eviction=eviction,
                                             keep_conversation=True)
        with pytest.raises(grpc.RpcError) as raised:
            list(stub.Generate(request, timeout=TIMEOUT))
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        final = list(stub.Generate(request, timeout=TIMEOUT, metadata=bearer("alice")))[-1]
        assert final.summary.reports > 0 and not final.summary.manager_fallback  # decided by the manager
        assert sum(final.summary.evicted_per_layer) > 0
        follow = worker_pb2.GenerateRequest(text=" more", max_new_tokens=2, conversation_id=final.conversation_id)
        with pytest.raises(grpc.RpcError) as raised:  # bob holds alice's id: no such conversation
            list(stub.Generate(follow, timeout=TIMEOUT, metadata=bearer("bob")))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert list(stub.Generate(follow, timeout=TIMEOUT, metadata=bearer("alice")))[-1].summary.generated_tokens
    finally:
        channel.close()
        worker.kill()
    assert WORKER_READY.search(worker.output)


def test_an_error_echoing_a_huge_field_still_reaches_the_client(token_manager) -> None:
    """The details travel percent-encoded in a trailer gRPC drops past 8 KiB: 2000 four-byte
    characters would arrive as RESOURCE_EXHAUSTED 'Stream removed' if sent whole."""
    _, stub, _ = token_manager
    alice = As(stub, bearer("alice"))
    for name in ("\N{SLIGHTLY SMILING FACE}" * 2000, "x" * 70_000):
        request = open_request("tova", budget=8)
        request.budget.allocator = name
        for _ in range(5):  # gRPC's drops were intermittent
            code, details = code_of(alice.OpenSession, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith("budget.allocator: ") and len(details.encode()) <= 1024
