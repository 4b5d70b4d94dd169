"""The worker's client of a remote cache manager (gRPC).

Every call has a retry budget (`retry_budget_s`, 15 s by default): UNAVAILABLE and
DEADLINE_EXCEEDED are retried, with the same request, until the budget is spent (or `retries`
retries are made, when given). A ReportBlock keeps its sequence number, so a retry of a report
the manager already decided returns the stored decision, and a manager or Redis restart within
the budget changes nothing. Each attempt's deadline is min(`timeout_s`, what is left of the
budget); retries are spread by exponential backoff with full jitter, capped at `max_backoff_s`,
the backoff counted from the previous attempt's start (an attempt that waited out its deadline
is followed at once). Attempts wait for the channel to connect (`wait_for_ready`) instead of
failing while it reconnects, and the channel reconnects at most 0.6 s apart
(kvevict.grpc_options), so a call resumes within a second of the manager's return.

When the budget is spent the call raises `ManagerUnavailable`, which the cache session turns
into fail-open; until a call is answered again, a new session's OpenSession waits only
DOWN_OPEN_BUDGET_S, so during an outage new requests fall back at once rather than each after
the whole budget (reports of open sessions keep the whole budget). UNAUTHENTICATED and PERMISSION_DENIED raise `ManagerAuthError` at once: retrying
cannot help, and deciding in-process would hide a misconfigured worker. Other status codes come
back as the manager domain's errors, so embedded and remote sessions fail the same way.

`credentials` (e.g. `grpc.ssl_channel_credentials(root_certificates=...)`) make the channel TLS;
`token` goes with every call as `authorization: Bearer <token>` (send it over TLS only).

    client = RemoteManagerClient("manager:50051", retry_budget_s=15.0, token=token,
                                 credentials=grpc.ssl_channel_credentials(ca_pem))
"""

from __future__ import annotations

import random
import time
from typing import Callable

import grpc
from google.protobuf.message import Message

from kvevict.auth import token_metadata
from kvevict.cache_manager.errors import Aborted, InvalidArgument, ManagerError, NotFound, ResourceExhausted
from kvevict.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
AUTH_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# How long a new session waits for a manager the last call found unreachable (see open_session).
DOWN_OPEN_BUDGET_S = 1.0
# No attempt starts with less of the budget left (it could not even connect).
MIN_ATTEMPT_S = 0.01


class ManagerUnavailable(ManagerError):
    """The manager did not answer within the retry budget (UNAVAILABLE / DEADLINE_EXCEEDED)."""


class ManagerAuthError(ManagerError):
    """The manager refused the worker's credentials (UNAUTHENTICATED: no or a wrong token or
    client certificate; PERMISSION_DENIED: an identity it does not serve). Never retried, never
    a fallback: the worker's token or TLS settings need fixing."""

    def __init__(self, address: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"the cache manager at {address} refused the worker's credentials ({code.name}: {details}); "
                         f"check the worker's manager token and TLS settings")
        self.code = code


class RemoteManagerClient:
    """`ManagerClient` over a gRPC channel to `address` (host:port).

        client = RemoteManagerClient("127.0.0.1:50051")  # 15 s of retries per call
        client.open_session(request)
    """

    def __init__(self, address: str, timeout_s: float = 5.0, retries: int | None = None, backoff_s: float = 0.1,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, on_retry: Callable[[], None] | None = None,
                 retry_budget_s: float = 15.0, max_backoff_s: float = 1.0,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> None:
        """`timeout_s`: the longest one attempt waits; `retry_budget_s`: the longest a call
        waits, its retries and their backoff included; `retries`: at most this many retries as
        well (None: as many as the budget allows); `backoff_s`: the first retry's backoff ceiling,
        doubling up to `max_backoff_s`; `on_retry`, when given, is called before every retry
        (the worker's retry counter)."""
        for name, value in (("timeout_s", timeout_s), ("retry_budget_s", retry_budget_s), ("backoff_s", backoff_s),
                            ("max_backoff_s", max_backoff_s)):
            if not value > 0:
                raise ValueError(f"manager {name} must be > 0 s, got {value}")
        if retries is not None and retries < 0:
            raise ValueError(f"manager retries must be >= 0 (or None: only the retry budget), got {retries}")
        if token is not None and not (token and token.isascii() and token.isprintable() and token.strip() == token):
            raise ValueError("manager token must be non-empty printable ASCII without surrounding spaces")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retry_budget_s = retry_budget_s
        self.retries_made = 0
        # True from a call that spent its budget unreachable to the next answered one.
        self.unreachable = False
        self._on_retry = on_retry
        self._metadata = token_metadata(token) or None
        options = channel_options(max_message_bytes)
        self._channel = (grpc.insecure_channel(address, options=options) if credentials is None
                         else grpc.secure_channel(address, credentials, options=options))
        self._stub = pb_grpc.CacheManagerServiceStub(self._channel)

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        # A manager that just spent a whole budget unreachable is likely still down: a new
        # session waits DOWN_OPEN_BUDGET_S (the channel reconnects within it once it is back)
        # instead of stalling every new request the full budget before it falls back.
        # Sessions already open keep the whole budget: that is what rides out a restart.
        budget = min(self.retry_budget_s, DOWN_OPEN_BUDGET_S) if self.unreachable else None
        return self._call(self._stub.OpenSession, request, budget)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self._call(self._stub.ReportBlock, request)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return self._call(self._stub.CloseSession, request)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Message], request: Message, budget_s: float | None = None) -> Message:
        started = time.monotonic()
        deadline = started + (self.retry_budget_s if budget_s is None else budget_s)
        attempt = 0
        while True:
            attempt_started = time.monotonic()
            try:
                response = method(request, timeout=min(self.timeout_s, deadline - attempt_started),
                                  metadata=self._metadata, wait_for_ready=True)
                self.unreachable = False
                return response
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code not in RETRYABLE:
                    self.unreachable = False  # it answered, if only to refuse
                if code in AUTH_CODES:
                    raise ManagerAuthError(self.address, code, details) from error
                if code not in RETRYABLE:
                    raise _domain_error(code, details) from error
                # Full jitter keeps many workers from retrying in lockstep after a manager restart.
                ceiling = min(self.max_backoff_s, self.backoff_s * 2.0**min(attempt, 60))
                wake = attempt_started + random.uniform(0, ceiling)
                now = time.monotonic()
                if (self.retries is not None and attempt >= self.retries) or max(wake, now) > deadline - MIN_ATTEMPT_S:
                    self.unreachable = True
                    raise self._unavailable(now - started, attempt + 1, code, details) from error
                self.retries_made += 1
                if self._on_retry is not None:
                    self._on_retry()
                if wake > now:
                    time.sleep(wake - now)
                attempt += 1

    def _unavailable(self, waited_s: float, tries: int, code: grpc.StatusCode, details: str) -> ManagerUnavailable:
        # A call waiting for the channel ends DEADLINE_EXCEEDED whatever kept it from connecting.
        hint = (" (no answer, or no connection: is the manager up at this address, with matching TLS?)"
                if code == grpc.StatusCode.DEADLINE_EXCEEDED else "")
        return ManagerUnavailable(f"manager at {self.address} unreachable for {waited_s:.1f} s ({tries} tries, retry "
                                  f"budget {self.retry_budget_s:g} s): {code.name}: {details}{hint}")


def _domain_error(code: grpc.StatusCode, details: str) -> ManagerError:
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(": ")
        return InvalidArgument(field, message) if message else InvalidArgument("request", details)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.ABORTED:
        return Aborted(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(details)
    return ManagerError(f"{code.name}: {details}")
