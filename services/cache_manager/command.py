"""`kvevict manager serve`: the CacheManagerService gRPC server.

Every flag has an environment variable (the flag wins): KVEVICT_MANAGER_HOST, KVEVICT_MANAGER_PORT,
KVEVICT_REDIS_URL, KVEVICT_SESSION_TTL_S, KVEVICT_MAX_SESSIONS, KVEVICT_MAX_MESSAGE_MB,
KVEVICT_MAX_CONCURRENT_RPCS, KVEVICT_REDIS_TIMEOUT_S, KVEVICT_STATE_CACHE_MB, KVEVICT_GRACE_S,
KVEVICT_MANAGER_METRICS_PORT, KVEVICT_MAX_SESSIONS_PER_CLIENT, KVEVICT_MAX_SESSION_MB,
KVEVICT_REDIS_WAIT_REPLICAS, KVEVICT_LOG_LEVEL, and for security KVEVICT_MANAGER_TLS_CERT,
KVEVICT_MANAGER_TLS_KEY, KVEVICT_MANAGER_TLS_CLIENT_CA, KVEVICT_MANAGER_TLS_ALLOWED_CLIENTS,
KVEVICT_MANAGER_AUTH_TOKENS.
"""

from __future__ import annotations

import argparse
import os

from kvevict.security_options import add_server_security_flags, server_security

ENV = {
    "host": "KVEVICT_MANAGER_HOST",
    "port": "KVEVICT_MANAGER_PORT",
    "redis_url": "KVEVICT_REDIS_URL",
    "session_ttl": "KVEVICT_SESSION_TTL_S",
    "max_sessions": "KVEVICT_MAX_SESSIONS",
    "max_message_mb": "KVEVICT_MAX_MESSAGE_MB",
    "max_concurrent_rpcs": "KVEVICT_MAX_CONCURRENT_RPCS",
    "redis_timeout": "KVEVICT_REDIS_TIMEOUT_S",
    "state_cache_mb": "KVEVICT_STATE_CACHE_MB",
    "grace": "KVEVICT_GRACE_S",
    "metrics_port": "KVEVICT_MANAGER_METRICS_PORT",
    "max_sessions_per_client": "KVEVICT_MAX_SESSIONS_PER_CLIENT",
    "max_session_mb": "KVEVICT_MAX_SESSION_MB",
    "redis_wait_replicas": "KVEVICT_REDIS_WAIT_REPLICAS",
    "log_level": "KVEVICT_LOG_LEVEL",
}


def add_commands(subparsers) -> None:
    """Registers `manager serve`."""
    manager = subparsers.add_parser("manager", help="the cache manager service")
    commands = manager.add_subparsers(dest="manager_command", required=True)
    serve = commands.add_parser(
        "serve", help="serve CacheManagerService over gRPC until SIGTERM",
        description="Serves kvevict.v1.CacheManagerService (plus health and reflection) until SIGTERM or SIGINT. "
                    "Each flag defaults to its environment variable, shown in brackets.",
    )
    add_serve_flags(serve)
    serve.set_defaults(run=run_serve)


def _env(parser: argparse.ArgumentParser, flag: str, dest: str, default: str, help: str, **kwargs) -> None:
    variable = ENV[dest]
    parser.add_argument(flag, dest=dest, default=os.environ.get(variable, default),
                        help=f"{help} [{variable}, default {default}]", **kwargs)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    _env(parser, "--host", "host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    _env(parser, "--port", "port", "50051", "port to listen on; 0 picks a free one (logged when ready)", type=int)
    _env(parser, "--redis-url", "redis_url", "memory://",
         "session state store: redis://host:port/db, rediss:// (TLS), redis-cluster://host:port[,host:port] "
         "(Redis Cluster), or memory:// for in-process state (a single replica)")
    _env(parser, "--session-ttl", "session_ttl", "3600", "seconds an idle session lives (refreshed on every write)", type=int)
    _env(parser, "--max-sessions", "max_sessions", "10000",
         "open sessions allowed (shared by all replicas with Redis); more: RESOURCE_EXHAUSTED; 0 = no limit", type=int)
    _env(parser, "--max-sessions-per-client", "max_sessions_per_client", "0",
         "open sessions one client (identity) may hold; more: RESOURCE_EXHAUSTED; 0 = no limit", type=int)
    _env(parser, "--max-session-mb", "max_session_mb", "256",
         "MiB of tracked state one session may hold; a budget or report beyond: RESOURCE_EXHAUSTED; 0 = no cap",
         type=float)
    _env(parser, "--redis-wait-replicas", "redis_wait_replicas", "0",
         "Redis replicas that must acknowledge every state write (WAIT): a failed-over master loses no "
         "answered decision", type=int)
    _env(parser, "--max-message-mb", "max_message_mb", "64", "largest request / response in MiB", type=float)
    _env(parser, "--max-concurrent-rpcs", "max_concurrent_rpcs", "256",
         "calls served at once; more: RESOURCE_EXHAUSTED; 0 = no limit", type=int)
    _env(parser, "--redis-timeout", "redis_timeout", "2.0", "seconds before a Redis command fails UNAVAILABLE", type=float)
    _env(parser, "--state-cache-mb", "state_cache_mb", "256",
         "MiB of session states each replica caches to skip reading them back from Redis; 0 = none", type=float)
    _env(parser, "--grace", "grace", "10", "seconds running calls may finish after SIGTERM", type=float)
    _env(parser, "--metrics-port", "metrics_port", "9464",
         "port of the Prometheus /metrics page (on --host); 0 picks a free one (logged when ready), -1 = none",
         type=int)
    _env(parser, "--log-level", "log_level", "INFO", "debug, info, warning or error (debug logs every call)")
    add_server_security_flags(parser, "KVEVICT_MANAGER")


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kvevict import logs
    from kvevict.cache_manager.server import ServerConfig, serve

    config = ServerConfig(
        host=args.host, port=args.port, redis_url=args.redis_url or "memory://",
        session_ttl_s=args.session_ttl, max_sessions=args.max_sessions,
        max_message_bytes=int(args.max_message_mb * 2**20), max_concurrent_rpcs=args.max_concurrent_rpcs,
        redis_timeout_s=args.redis_timeout, state_cache_bytes=int(args.state_cache_mb * 2**20), grace_s=args.grace,
        metrics_port=args.metrics_port, max_sessions_per_client=args.max_sessions_per_client,
        max_session_bytes=int(args.max_session_mb * 2**20), redis_wait_replicas=args.redis_wait_replicas,
        security=server_security(args),
    )
    logs.configure(args.log_level)
    asyncio.run(serve(config))
    return 0
