"""The worker's Prometheus metrics (`worker serve --metrics-port`, default 9465).

Evicted tokens are counted per KV head, the EvictionSummary's unit: `evicted_tokens_total` grows
by exactly the sum of the summaries' evicted_per_layer (the manager's
`kvevict_manager_tokens_evicted_total` counts every KV head: num_kv_heads times as many).

    kvevict_worker_requests_total{method, outcome}   counter    method generate|score; outcome ok|cancelled
                                                                (client gone, deadline, shutdown)|invalid
                                                                (INVALID_ARGUMENT, FAILED_PRECONDITION)|
                                                                rejected (queue full, too large, loading,
                                                                shutting down, manager refused the session)|
                                                                error (manager lost with fail-open off, bugs)
    kvevict_worker_generated_tokens_total            counter    tokens sampled (cancelled requests' too)
    kvevict_worker_prompt_tokens_total               counter    prompt tokens prefilled (Score: the scored text)
    kvevict_worker_evicted_tokens_total              counter    tokens evicted per KV head, summed over layers,
                                                                counted at each eviction
    kvevict_worker_prefill_duration_seconds          histogram  prefill of one request (Score: the whole pass)
    kvevict_worker_decode_token_duration_seconds     histogram  per generated token, the time since the
                                                                previous one (the first: since the prefill
                                                                ended); per request _count = generated tokens
                                                                and _sum = the summary's decode_seconds
    kvevict_worker_decode_tokens_per_second          gauge      decode speed of the latest finished generation
    kvevict_worker_kv_cache_bytes                    gauge      keys + values held by the requests in flight,
                                                                updated after every forward and every eviction
                                                                (0 when idle)
    kvevict_worker_kv_cache_full_bytes               gauge      what those requests' caches would hold had
                                                                nothing been evicted
    kvevict_worker_manager_round_trip_seconds        histogram  every ReportBlock call, embedded or remote,
                                                                retries included, failed ones too
    kvevict_worker_manager_retries_total             counter    manager calls retried (UNAVAILABLE, deadline)
    kvevict_worker_manager_fallbacks_total           counter    sessions that went on in-process (fail-open)
    kvevict_worker_queue_depth                       gauge      requests waiting for the model (not the running one)
    kvevict_worker_rpcs_total{method, code}          counter    gRPC calls by method and status code
    kvevict_worker_rpc_duration_seconds{method}      histogram  gRPC call durations (Generate: the whole stream)

plus prometheus-client's process_*, python_gc_* and python_info.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvevict.metrics import RpcMetrics, exponential_buckets, new_registry
from kvevict.v1 import worker_pb2

METHODS = ("generate", "score")
OUTCOMES = ("ok", "cancelled", "invalid", "rejected", "error")
RPC_METHODS = tuple(m.name for m in worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].methods)

PREFILL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = exponential_buckets(2.5e-4, 2, 14)  # 250 us .. 2 s
ROUND_TRIP_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RPC_BUCKETS = (1e-3, 5e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class WorkerMetrics:
    """Every metric of one worker process, in its own registry (see the module docstring). The
    generator and cache session call the methods below from the model thread."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 queue_depth: Callable[[], int] | None = None) -> None:
        self.registry = registry = registry if registry is not None else new_registry()
        self.requests = Counter("kvevict_worker_requests", "Generate and Score requests by how they ended",
                                ("method", "outcome"), registry=registry)
        for method in METHODS:
            for outcome in OUTCOMES:
                self.requests.labels(method, outcome)
        self.generated_tokens = Counter("kvevict_worker_generated_tokens", "Tokens generated", registry=registry)
        self.prompt_tokens = Counter("kvevict_worker_prompt_tokens", "Prompt tokens prefilled (Score: scored tokens)",
                                     registry=registry)
        self.evicted_tokens = Counter("kvevict_worker_evicted_tokens",
                                      "Tokens evicted per KV head, summed over layers", registry=registry)
        self.prefill_seconds = Histogram("kvevict_worker_prefill_duration_seconds", "Prefill time of a request",
                                         registry=registry, buckets=PREFILL_BUCKETS)
        self.token_seconds = Histogram("kvevict_worker_decode_token_duration_seconds",
                                       "Decode time of a generated token (since the previous token)",
                                       registry=registry, buckets=TOKEN_BUCKETS)
        self.tokens_per_second = Gauge("kvevict_worker_decode_tokens_per_second",
                                       "Decode speed of the latest finished generation", registry=registry)
        self.kv_bytes = Gauge("kvevict_worker_kv_cache_bytes", "Key and value bytes cached by the requests in flight",
                              registry=registry)
        self.full_kv_bytes = Gauge("kvevict_worker_kv_cache_full_bytes",
                                   "Key and value bytes the requests in flight would cache without eviction",
                                   registry=registry)
        self.round_trip_seconds = Histogram("kvevict_worker_manager_round_trip_seconds",
                                            "ReportBlock calls to the cache manager (embedded or remote)",
                                            registry=registry, buckets=ROUND_TRIP_BUCKETS)
        self.manager_retries = Counter("kvevict_worker_manager_retries", "Cache manager calls retried",
                                       registry=registry)
        self.manager_fallbacks = Counter("kvevict_worker_manager_fallbacks",
                                         "Sessions that went on with an in-process manager (fail-open)",
                                         registry=registry)
        self.queue_depth = Gauge("kvevict_worker_queue_depth", "Requests waiting for the model", registry=registry)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        self.rpcs = RpcMetrics(registry, "kvevict_worker", RPC_METHODS, RPC_BUCKETS)

    # -- called by the generator and the cache session (model thread) ------------------------
    def prefilled(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def prefill_done(self, seconds: float) -> None:
        self.prefill_seconds.observe(seconds)

    def token_generated(self, seconds: float) -> None:
        self.generated_tokens.inc()
        self.token_seconds.observe(seconds)

    def generation_done(self, tokens: int, decode_seconds: float) -> None:
        if tokens > 0 and decode_seconds > 0:
            self.tokens_per_second.set(tokens / decode_seconds)

    def reported(self, seconds: float) -> None:
        self.round_trip_seconds.observe(seconds)

    def evicted(self, tokens: int) -> None:
        if tokens:
            self.evicted_tokens.inc(tokens)

    def kv_cache_changed(self, kv_bytes_delta: int, full_bytes_delta: int) -> None:
        if kv_bytes_delta:
            self.kv_bytes.inc(kv_bytes_delta)
        if full_bytes_delta:
            self.full_kv_bytes.inc(full_bytes_delta)

    def fell_back(self) -> None:
        self.manager_fallbacks.inc()

    def retried(self) -> None:
        self.manager_retries.inc()

    # -- called by the servicer ----------------------------------------------------------------
    def request_done(self, method: str, outcome: str) -> None:
        self.requests.labels(method, outcome).inc()
