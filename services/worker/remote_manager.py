"""The worker's client of a remote cache manager (gRPC).

Every call carries a deadline; UNAVAILABLE and DEADLINE_EXCEEDED are retried with exponential
backoff and jitter, with the same request (a ReportBlock keeps its sequence number, so a retry of
a report the manager already decided returns the stored decision). When the manager stays
unreachable the call raises `ManagerUnavailable`, which the cache session turns into fail-open.
Other status codes come back as the manager domain's errors, so embedded and remote sessions
fail the same way.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import grpc
from google.protobuf.message import Message

from kvevict.cache_manager.errors import Aborted, InvalidArgument, ManagerError, NotFound, ResourceExhausted
from kvevict.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class ManagerUnavailable(ManagerError):
    """The manager did not answer within the retries (UNAVAILABLE / DEADLINE_EXCEEDED)."""


class RemoteManagerClient:
    """`ManagerClient` over a gRPC channel to `address` (host:port)."""

    def __init__(self, address: str, timeout_s: float = 5.0, retries: int = 3, backoff_s: float = 0.1,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, on_retry: Callable[[], None] | None = None) -> None:
        """`on_retry`, when given, is called before every retry (the worker's retry counter)."""
        if timeout_s <= 0:
            raise ValueError(f"manager timeout must be > 0 s, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"manager retries must be >= 0, got {retries}")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.retries_made = 0
        self._on_retry = on_retry
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.CacheManagerServiceStub(self._channel)

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        return self._call(self._stub.OpenSession, request)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        return self._call(self._stub.ReportBlock, request)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return self._call(self._stub.CloseSession, request)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Message], request: Message) -> Message:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as error:
                code = error.code()
                if code not in RETRYABLE:
                    raise _domain_error(code, error.details() or "") from error
                if attempt == self.retries:
                    raise ManagerUnavailable(
                        f"manager at {self.address} unreachable after {attempt + 1} tries: "
                        f"{code.name}: {error.details()}") from error
                self.retries_made += 1
                if self._on_retry is not None:
                    self._on_retry()
                # Full jitter keeps many workers from retrying in lockstep after a manager restart.
                time.sleep(random.uniform(0, self.backoff_s * 2**attempt))
        raise AssertionError("unreachable")


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
