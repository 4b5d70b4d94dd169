"""`kvevict worker serve` (the WorkerService gRPC server) and `kvevict client generate|score`.

Every flag of `worker serve` has an environment variable (the flag wins): KVEVICT_WORKER_HOST,
KVEVICT_WORKER_PORT, KVEVICT_MODEL, KVEVICT_DEVICE, KVEVICT_DTYPE, KVEVICT_THREADS,
KVEVICT_MANAGER, KVEVICT_MANAGER_TIMEOUT_S, KVEVICT_MANAGER_RETRIES, KVEVICT_FAIL_OPEN,
KVEVICT_DEFAULT_MAX_NEW_TOKENS, KVEVICT_MAX_NEW_TOKENS_LIMIT, KVEVICT_MAX_PROMPT_TOKENS,
KVEVICT_MAX_QUEUE, KVEVICT_MAX_MESSAGE_MB, KVEVICT_GRACE_S, KVEVICT_WORKER_METRICS_PORT,
KVEVICT_LOG_LEVEL, KVEVICT_MANAGER_RETRY_BUDGET_S; for security KVEVICT_WORKER_TLS_CERT,
KVEVICT_WORKER_TLS_KEY, KVEVICT_WORKER_TLS_CLIENT_CA, KVEVICT_WORKER_TLS_ALLOWED_CLIENTS,
KVEVICT_WORKER_AUTH_TOKENS and, for the manager channel, KVEVICT_WORKER_MANAGER_TLS_CA,
KVEVICT_WORKER_MANAGER_TLS_CERT, KVEVICT_WORKER_MANAGER_TLS_KEY, KVEVICT_WORKER_MANAGER_TOKEN_FILE.
The clients read KVEVICT_WORKER (host:port) and KVEVICT_CLIENT_TLS_CA, KVEVICT_CLIENT_TLS_CERT,
KVEVICT_CLIENT_TLS_KEY, KVEVICT_CLIENT_TOKEN_FILE.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kvevict import defaults
from kvevict.cli_options import (add_eviction_flags, add_runtime_flags, add_sampling_flags, budget_spec,
                                 env_default, env_flag, policy_spec, statistics_dtype)
from kvevict.security_options import (add_client_security_flags, add_server_security_flags, client_security,
                                      server_security)

DEFAULT_WORKER = "127.0.0.1:50052"


def add_commands(subparsers) -> None:
    """Registers `worker serve`, `client generate` and `client score`."""
    worker = subparsers.add_parser("worker", help="the worker service (model runner)")
    commands = worker.add_subparsers(dest="worker_command", required=True)
    serve = commands.add_parser(
        "serve", help="serve WorkerService over gRPC until SIGTERM",
        description="Loads a model and serves kvevict.v1.WorkerService (plus health and reflection) until SIGTERM "
                    "or SIGINT. Requests are served one at a time in arrival order. Each flag defaults to its "
                    "environment variable, shown in brackets.")
    add_serve_flags(serve)
    serve.set_defaults(run=run_serve)

    client = subparsers.add_parser("client", help="call a running worker")
    client_commands = client.add_subparsers(dest="client_command", required=True)
    generate = client_commands.add_parser("generate", help="stream a generation from a worker",
                                          description="Streams the text as it arrives, then the eviction summary.")
    add_generate_flags(generate)
    generate.set_defaults(run=_run_client_generate)
    score = client_commands.add_parser("score", help="perplexity of a text under eviction, from a worker")
    add_score_flags(score)
    score.set_defaults(run=_run_client_score)


def _env(parser: argparse.ArgumentParser, flag: str, dest: str, variable: str, default: str | None, help: str,
         **kwargs) -> None:
    shown = "none" if default is None else default
    parser.add_argument(flag, dest=dest, default=env_default(variable, default),
                        help=f"{help} [{variable}, default {shown}]", **kwargs)


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    _env(parser, "--host", "host", "KVEVICT_WORKER_HOST", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    _env(parser, "--port", "port", "KVEVICT_WORKER_PORT", "50052",
         "port to listen on; 0 picks a free one (logged in the ready line)", type=int)
    _env(parser, "--model", "model", "KVEVICT_MODEL", None, "local checkpoint directory or Hugging Face hub id (required)")
    add_runtime_flags(parser)
    parser.set_defaults(device=env_default("KVEVICT_DEVICE", "cpu"), dtype=env_default("KVEVICT_DTYPE", "float32"),
                        threads=env_default("KVEVICT_THREADS", None))
    parser.add_argument("--trust-remote-code", action="store_true")
    _env(parser, "--manager", "manager", "KVEVICT_MANAGER", "embedded",
         "cache manager: host:port of a CacheManagerService, or `embedded` (in-process, in-memory state)")
    _env(parser, "--manager-timeout", "manager_timeout", "KVEVICT_MANAGER_TIMEOUT_S", "5.0",
         "deadline of one manager call, seconds", type=float)
    _env(parser, "--manager-retry-budget", "manager_retry_budget", "KVEVICT_MANAGER_RETRY_BUDGET_S", "15",
         "seconds a manager call that is UNAVAILABLE or past its deadline is retried (with backoff): long "
         "enough to ride out a manager or Redis restart", type=float)
    _env(parser, "--manager-retries", "manager_retries", "KVEVICT_MANAGER_RETRIES", None,
         "an extra cap on the retries of one manager call (default: the budget alone)", type=int)
    add_client_security_flags(parser, "manager-", "KVEVICT_WORKER_MANAGER", "the manager")
    parser.add_argument("--fail-open", action=argparse.BooleanOptionalAction, default=None,
                        help="when the manager stays unreachable, decide in-process with the same policy code "
                             "(--no-fail-open: fail the request UNAVAILABLE) [KVEVICT_FAIL_OPEN, default true]")
    _env(parser, "--default-max-new-tokens", "default_max_new_tokens", "KVEVICT_DEFAULT_MAX_NEW_TOKENS", "128",
         "tokens generated when a request says 0", type=int)
    _env(parser, "--max-new-tokens-limit", "max_new_tokens_limit", "KVEVICT_MAX_NEW_TOKENS_LIMIT", "4096",
         "most tokens one request may ask for; more: RESOURCE_EXHAUSTED", type=int)
    _env(parser, "--max-prompt-tokens", "max_prompt_tokens", "KVEVICT_MAX_PROMPT_TOKENS", "32768",
         "longest prompt (or scored text) in tokens; longer: RESOURCE_EXHAUSTED", type=int)
    _env(parser, "--max-queue", "max_queue", "KVEVICT_MAX_QUEUE", "16",
         "requests waiting behind the running one; more: RESOURCE_EXHAUSTED", type=int)
    _env(parser, "--max-message-mb", "max_message_mb", "KVEVICT_MAX_MESSAGE_MB", "64",
         "largest request / response in MiB (also of the manager channel)", type=float)
    _env(parser, "--grace", "grace", "KVEVICT_GRACE_S", "10",
         "seconds running requests may finish after SIGTERM before they are cancelled", type=float)
    _env(parser, "--metrics-port", "metrics_port", "KVEVICT_WORKER_METRICS_PORT", "9465",
         "port of the Prometheus /metrics page (on --host); 0 picks a free one (logged when ready), -1 = none",
         type=int)
    _env(parser, "--max-conversations", "max_conversations", "KVEVICT_MAX_CONVERSATIONS", "16",
         "conversations kept between requests (GenerateRequest.keep_conversation); more: RESOURCE_EXHAUSTED",
         type=int)
    _env(parser, "--conversation-ttl", "conversation_ttl", "KVEVICT_CONVERSATION_TTL_S", "600",
         "seconds a kept conversation lives without a request continuing it", type=float)
    _env(parser, "--log-level", "log_level", "KVEVICT_LOG_LEVEL", "INFO", "debug, info, warning or error")
    add_server_security_flags(parser, "KVEVICT_WORKER")
    group = parser.add_argument_group("eviction of requests that do not set it")
    add_eviction_flags(group)


def _lookahead(args: argparse.Namespace) -> int:
    raw = args.lookahead if args.lookahead is not None else os.environ.get("KVEVICT_LOOKAHEAD") or 0
    try:
        count = int(raw)
    except ValueError:
        raise ValueError(f"--lookahead (KVEVICT_LOOKAHEAD): a number of tokens, got {raw!r}") from None
    if count < 0:
        raise ValueError(f"--lookahead must be >= 0, got {count}")
    return count


def run_serve(args: argparse.Namespace) -> int:
    import asyncio

    from transformers.utils import logging as transformers_logging

    from kvevict import logs
    from kvevict.worker.prompts import EvictionDefaults, Limits
    from kvevict.worker.server import WorkerConfig, serve

    if not args.model:
        raise ValueError("--model (or KVEVICT_MODEL) is required")
    fail_open = args.fail_open if args.fail_open is not None else env_flag(os.environ.get("KVEVICT_FAIL_OPEN") or "true")
    config = WorkerConfig(
        model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
        threads=int(args.threads) if args.threads is not None else None, trust_remote_code=args.trust_remote_code,
        manager=args.manager, manager_timeout_s=args.manager_timeout, manager_retries=args.manager_retries,
        manager_retry_budget_s=args.manager_retry_budget, manager_security=client_security(args, "manager-"),
        security=server_security(args),
        eviction=EvictionDefaults(policy=policy_spec(args), budget=budget_spec(args),
                                  block_size=args.block_size or defaults.BLOCK_SIZE,
                                  statistics_dtype=statistics_dtype(args), fail_open=fail_open,
                                  pipelined=args.pipelined if args.pipelined is not None
                                  else env_flag(os.environ.get("KVEVICT_PIPELINED") or "false"),
                                  lookahead=_lookahead(args)),
        limits=Limits(default_max_new_tokens=args.default_max_new_tokens,
                      max_new_tokens_limit=args.max_new_tokens_limit, max_prompt_tokens=args.max_prompt_tokens),
        max_queue=args.max_queue, max_message_bytes=int(args.max_message_mb * 2**20), grace_s=args.grace,
        metrics_port=args.metrics_port, max_conversations=args.max_conversations,
        conversation_ttl_s=args.conversation_ttl,
    )
    logs.configure(args.log_level)
    transformers_logging.disable_progress_bar()  # weight-loading bars are not log lines
    return asyncio.run(serve(config))


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", default=env_default("KVEVICT_WORKER", DEFAULT_WORKER),
                        help=f"host:port of the worker [KVEVICT_WORKER, default {DEFAULT_WORKER}]")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of the call, seconds (default none)")
    add_client_security_flags(parser, "", "KVEVICT_CLIENT", "the worker")


def add_generate_flags(parser: argparse.ArgumentParser) -> None:
    _add_client_flags(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("prompt", nargs="?", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    prompt.add_argument("--token-ids", help="prompt as token ids: 1,2,3 or '1 2 3'")
    prompt.add_argument("--chat", type=Path, help='JSON file of chat messages: [{"role": "user", "content": "..."}]')
    parser.add_argument("--stop", action="append", help="stop string (repeatable); it is not printed")
    parser.add_argument("--keep-conversation", action="store_true",
                        help="keep the evicted cache for a next turn; prints its id (conversation: ID) on stderr")
    parser.add_argument("--conversation", default="", metavar="ID",
                        help="continue a kept conversation: the prompt is the next turn (the eviction flags are "
                             "those of its first turn and are not sent)")
    add_eviction_flags(parser)
    add_sampling_flags(parser, max_new_tokens=0, max_new_tokens_help="0 = the worker's default")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (completion, token ids, finish reason, eviction summary) "
                             "instead of streaming the text")


def add_score_flags(parser: argparse.ArgumentParser) -> None:
    _add_client_flags(parser)
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text to score")
    text.add_argument("--file", type=Path, help="file holding the text to score")
    text.add_argument("--token-ids", help="token ids to score: 1,2,3 or '1 2 3'")
    add_eviction_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (every token's log-probability, total, perplexity, eviction "
                             "summary) instead of the text")


def _run_client_generate(args: argparse.Namespace) -> int:
    from kvevict.worker.client import run_generate

    return run_generate(args)


def _run_client_score(args: argparse.Namespace) -> int:
    from kvevict.worker.client import run_score

    return run_score(args)
