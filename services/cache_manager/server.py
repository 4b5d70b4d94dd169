"""CacheManagerService over gRPC (grpc.aio): a thin servicer over AsyncManagerCore, health that
follows the state store, reflection, and a graceful stop on SIGTERM / SIGINT.

Status codes (the servicer's only logic): InvalidArgument -> INVALID_ARGUMENT (details start
with the field, `layers[3].values[1].dtype: ...`), NotFound -> NOT_FOUND (also another client's
session), Aborted -> ABORTED, FailedPrecondition (a retried sequence number with another
request) -> FAILED_PRECONDITION, ResourceExhausted (a session limit or the state cap, named) ->
RESOURCE_EXHAUSTED, StoreUnavailable (Redis down) -> UNAVAILABLE. gRPC itself answers
RESOURCE_EXHAUSTED to a message over `max_message_bytes` and to calls beyond
`max_concurrent_rpcs`. Before any handler: UNAUTHENTICATED / PERMISSION_DENIED (kvevict.auth),
and INVALID_ARGUMENT for bytes that are not a request message (kvevict.request_decoding).

Logs never hold a session id at info level (an id is the key to its session when nobody is
authenticated): they name sessions by `session_ref`, a digest that cannot be used as one.

Health (grpc.health.v1) reports SERVING for "" and "kvevict.v1.CacheManagerService" only while
the store answers a ping; a probe checks every `probe_interval_s` (and refreshes the open-session
gauge). Prometheus metrics (kvevict.cache_manager.metrics) are served over HTTP on
`metrics_port` (0: a free one, -1: none), on the same host as gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from kvevict.cache_manager.errors import (
    Aborted, FailedPrecondition, InvalidArgument, ManagerError, NotFound, ResourceExhausted, StoreUnavailable,
)
from kvevict.logs import RateLimitedLog, log_event, session_ref
from kvevict.cache_manager.metrics import ManagerMetrics
from kvevict.cache_manager.service import AsyncManagerCore
from kvevict.cache_manager.state import AsyncInMemoryStateStore, AsyncStateStore, InMemoryStateStore
from kvevict.grpc_options import DEFAULT_MAX_MESSAGE_BYTES, server_options
from kvevict.grpc_server import ServiceHealth, bind, status_details
from kvevict.request_decoding import RequestDecodingInterceptor, wire_size
from kvevict.security_options import ServerSecurity
from kvevict.metrics import DISABLED_PORT, MetricsServer, check_metrics_port
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import cache_manager_pb2_grpc as pb_grpc

log = logging.getLogger("kvevict.manager")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CacheManagerService"].full_name
STATUS_CODES: tuple[tuple[type[ManagerError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Aborted, grpc.StatusCode.ABORTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def status_code(error: ManagerError) -> grpc.StatusCode:
    """The gRPC status of a domain error (UNKNOWN for a ManagerError of no listed class)."""
    return next((code for cls, code in STATUS_CODES if isinstance(error, cls)), grpc.StatusCode.UNKNOWN)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis-cluster://", "rediss-cluster://")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `manager serve` is configured with (flags / KVEVICT_* environment variables)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (logged in the ready line)
    redis_url: str = "memory://"  # memory:// = in-process state (one replica only)
    session_ttl_s: int = 3600
    max_sessions: int = 10_000  # across replicas with Redis; 0 = no limit
    max_sessions_per_client: int = 0  # open sessions of one identity (kvevict.auth); 0 = no limit
    max_session_bytes: int = 256 * 2**20  # tracked state of one session; 0 = no cap
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 256  # beyond: RESOURCE_EXHAUSTED; 0 = no limit
    redis_timeout_s: float = 2.0
    state_cache_bytes: int = 256 * 2**20  # per replica, of states last read or written (Redis only)
    probe_interval_s: float = 1.0
    grace_s: float = 10.0
    metrics_port: int = 9464  # Prometheus /metrics; 0 = any free port, -1 = none
    redis_wait_replicas: int = 0  # replicas that must acknowledge every state write (WAIT)
    security: ServerSecurity = ServerSecurity()

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        for name in ("session_ttl_s", "max_message_bytes", "redis_timeout_s", "probe_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("port", "max_sessions", "max_concurrent_rpcs", "grace_s", "state_cache_bytes",
                     "max_sessions_per_client", "max_session_bytes", "redis_wait_replicas"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.redis_url == "memory://" or self.redis_url.startswith(REDIS_SCHEMES)):
            raise ValueError(f"redis URL must be memory:// or start with one of {', '.join(REDIS_SCHEMES)}, "
                             f"got {self.redis_url!r}")
        if self.redis_wait_replicas and self.in_memory:
            raise ValueError("redis_wait_replicas needs a Redis store (--redis-url)")

    @property
    def in_memory(self) -> bool:
        return self.redis_url == "memory://"


def make_store(config: ServerConfig) -> AsyncStateStore:
    if config.in_memory:
        return AsyncInMemoryStateStore(InMemoryStateStore(ttl_s=config.session_ttl_s, max_sessions=config.max_sessions or None,
                                                          max_sessions_per_owner=config.max_sessions_per_client))
    from kvevict.cache_manager.redis_store import RedisStateStore

    options = {}  # passed only when set: the defaults are the store's
    if config.max_sessions_per_client:
        options["max_sessions_per_owner"] = config.max_sessions_per_client
    if config.redis_wait_replicas:
        options["wait_replicas"] = config.redis_wait_replicas
        # Half the command timeout: a stalled replica fails the write, not the connection.
        options["wait_timeout_ms"] = max(1, int(config.redis_timeout_s * 500))
    return RedisStateStore.from_url(config.redis_url, timeout_s=config.redis_timeout_s,
                                    ttl_s=config.session_ttl_s, max_sessions=config.max_sessions,
                                    cache_bytes=config.state_cache_bytes, **options)


class CacheManagerServicer(pb_grpc.CacheManagerServiceServicer):
    """Decode (grpc did), establish the caller's identity, call the domain, encode; domain
    errors become status codes."""

    def __init__(self, core: AsyncManagerCore, security: ServerSecurity | None = None) -> None:
        self.core = core
        self.authenticator = (security or ServerSecurity()).authenticator
        # A client can make every call fail: its refusals must not flood the log.
        self._refusals = RateLimitedLog(log)

    async def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionResponse:
        response = await self._call("OpenSession", self.core.open_session, request, context)
        log_event(log, logging.INFO, "session.open", session_ref=session_ref(response.session_id),
                  base=request.policy.base, wrapper=request.policy.wrapper or "none", budget=request.budget.tokens)
        return response

    async def ReportBlock(self, request: pb.ReportBlockRequest, context) -> pb.ReportBlockResponse:
        return await self._call("ReportBlock", self.core.report_block, request, context)

    async def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionResponse:
        response = await self._call("CloseSession", self.core.close_session, request, context)
        log_event(log, logging.INFO, "session.close", session_ref=session_ref(request.session_id),
                  reports=response.reports, evicted_tokens=response.evicted_tokens)
        return response

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.GetSessionResponse:
        return await self._call("GetSession", self.core.get_session, request, context)

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context) -> pb.ListPoliciesResponse:
        return await self._call("ListPolicies", self.core.list_policies, request, context)

    async def _call(self, method: str, handler: Callable[..., Awaitable[Message]], request: Message, context):
        started = time.perf_counter()
        owner = self.authenticator.identity(context)  # AuthInterceptor refused callers without one
        try:
            response = await handler(request, owner)
        except ManagerError as error:
            code = status_code(error)
            details = status_details(str(error))
            self._refusals.event(logging.WARNING if code == grpc.StatusCode.UNAVAILABLE else logging.INFO,
                                 "rpc.error", method=method, code=code.name,
                                 session_ref=session_ref(getattr(request, "session_id", "")), error=details)
            await context.abort(code, details)
        except Exception:
            log.exception("%s", f"event=rpc.internal method={method}")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}")
        if log.isEnabledFor(logging.DEBUG):
            log_event(log, logging.DEBUG, "rpc.ok", method=method,
                      session_ref=session_ref(getattr(request, "session_id", "")),
                      ms=f"{(time.perf_counter() - started) * 1e3:.2f}", request_bytes=wire_size(request))
        return response


class ReadinessProbe:
    """Pings the store every `interval_s`; health is SERVING exactly while it answers."""

    def __init__(self, store: AsyncStateStore, health: ServiceHealth, interval_s: float, timeout_s: float,
                 metrics: ManagerMetrics | None = None) -> None:
        self.store = store
        self.health = health
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.serving: bool | None = None

    async def check(self) -> bool:
        try:
            await asyncio.wait_for(self.store.ping(), self.timeout_s)
            ok = True
        except Exception as error:  # any failure to answer means not ready
            ok, reason = False, f"{type(error).__name__}: {error}"
        if ok and self.metrics is not None:
            try:  # also prunes expired sessions, which the store tallies for the metrics
                self.metrics.sessions_counted(await asyncio.wait_for(self.store.count(), self.timeout_s))
            except Exception:  # the gauge keeps its last value; the next probe tries again
                pass
        if ok != self.serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(status)
            level = logging.INFO if ok else logging.WARNING
            log_event(log, level, "health", status=health_pb2.HealthCheckResponse.ServingStatus.Name(status),
                      reason=None if ok else reason)
            self.serving = ok
        return ok

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check()


class ManagerServer:
    """The running server: `start()` binds and returns the port, `stop()` drains and closes."""

    def __init__(self, config: ServerConfig, store: AsyncStateStore | None = None) -> None:
        self.config = config
        self.store = store or make_store(config)
        self.metrics = None if config.metrics_port == DISABLED_PORT else ManagerMetrics()
        self.core = AsyncManagerCore(self.store, metrics=self.metrics, max_state_bytes=config.max_session_bytes)
        # Counted first (every outcome), then refused without credentials, then decoded.
        interceptors = [] if self.metrics is None else [self.metrics.rpcs.interceptor()]
        interceptors += [*config.security.interceptors(), RequestDecodingInterceptor()]
        # No SO_REUSEPORT: a port already taken is an error, not a second, silent listener.
        self.server = grpc.aio.server(options=[*server_options(config.max_message_bytes), ("grpc.so_reuseport", 0)],
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
                                      interceptors=interceptors)
        pb_grpc.add_CacheManagerServiceServicer_to_server(CacheManagerServicer(self.core, config.security), self.server)
        self.health = ServiceHealth(self.server, SERVICE_NAME)
        self.probe = ReadinessProbe(self.store, self.health, config.probe_interval_s,
                                    timeout_s=min(config.probe_interval_s, config.redis_timeout_s), metrics=self.metrics)
        self.metrics_server = None
        if self.metrics is not None:
            self.metrics.watch_store(self.store)
            self.metrics_server = MetricsServer(self.metrics.registry)
        self.port = 0
        self.metrics_port = DISABLED_PORT
        self._probe_task: asyncio.Task | None = None

    async def start(self) -> int:
        """Binds gRPC, then the metrics port (OSError if either is taken), and starts serving."""
        self.port = bind(self.server, self.config.host, self.config.port, self.config.security.credentials())
        if self.metrics_server is not None:
            self.metrics_port = self.metrics_server.start(self.config.host, self.config.metrics_port)
        await self.health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.probe.check()  # health is right from the first call; a down store does not block startup
        self._probe_task = asyncio.create_task(self.probe.run())
        await self.server.start()
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, stop accepting calls, let running ones finish for `grace_s`, close the store."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_s if grace_s is None else grace_s)
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        await self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def serve(config: ServerConfig) -> None:
    """Runs until SIGTERM or SIGINT, then stops gracefully. Logs `event=manager.ready ... port=N`."""
    from kvevict.cache_manager.redis_store import redact

    server = ManagerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    log_event(log, logging.INFO, "manager.ready", host=config.host, port=port,
              metrics_port=None if server.metrics_server is None else server.metrics_port,
              store="memory" if config.in_memory else redact(config.redis_url), session_ttl_s=config.session_ttl_s,
              max_sessions=config.max_sessions, max_sessions_per_client=config.max_sessions_per_client,
              max_message_bytes=config.max_message_bytes, security=config.security.describe(),
              serving=server.probe.serving)
    await stop.wait()
    log_event(log, logging.INFO, "manager.stopping", grace_s=config.grace_s)
    await server.stop()
    log_event(log, logging.INFO, "manager.stopped")
