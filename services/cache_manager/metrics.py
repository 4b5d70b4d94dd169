"""The cache manager's Prometheus metrics (`manager serve --metrics-port`, default 9464).

A "token" below is one (layer, KV head, token) cache entry, the unit of
ReportBlockResponse.evicted_tokens: summed over layers, `kvevict_manager_tokens_evicted_total`
grows by exactly the responses' evicted_tokens (= num_kv_heads x the worker's per-head count).

    kvevict_manager_sessions_active                   gauge      open sessions in this replica's store
                                                                 (Redis: every replica's), refreshed by
                                                                 the health probe (every probe interval)
    kvevict_manager_sessions_opened_total             counter    OpenSession calls that opened one
    kvevict_manager_sessions_closed_total             counter    CloseSession calls that closed one
    kvevict_manager_sessions_expired_total            counter    sessions whose TTL ran out unclosed, counted
                                                                 when the store prunes them (Redis: by the
                                                                 replica that prunes the id from the shared
                                                                 index, so replicas sum to the total)
    kvevict_manager_reports_total{phase, outcome}     counter    ReportBlock calls: phase prefill|decode
                                                                 (unspecified: a report without one),
                                                                 outcome decided|retry|invalid|aborted|
                                                                 not_found|unavailable (error: a bug)
    kvevict_manager_tokens_evaluated_total{layer}     counter    tokens decided on (cache incl. new tokens)
    kvevict_manager_tokens_evicted_total{layer}       counter    tokens evicted
    kvevict_manager_tokens_kept_total{layer}          counter    tokens kept (evaluated = kept + evicted)
    kvevict_manager_layer_budget_tokens{layer}        gauge      budget per KV head of the latest decision
    kvevict_manager_evicted_caote_error               histogram  CAOTE score (output-error units) of every
                                                                 evicted token of caote/fastcaote sessions
    kvevict_manager_head_budget_ratio                 histogram  per-head sessions (adahead, global, lukv):
                                                                 every (layer, KV head)'s budget after a
                                                                 decision / BudgetSpec.tokens (1 = uniform)
    kvevict_manager_decision_duration_seconds         histogram  validation + decision of a decided report
    kvevict_manager_report_payload_bytes              histogram  serialized size of every ReportBlock request
    kvevict_manager_redis_operation_duration_seconds{operation}  histogram  time talking to Redis per
                                                                 operation (ping get create update delete count)
    kvevict_manager_redis_errors_total{operation}     counter    operations that failed (UNAVAILABLE)
    kvevict_manager_rpcs_total{method, code}          counter    gRPC calls by method and status code
    kvevict_manager_rpc_duration_seconds{method}      histogram  gRPC call durations

plus prometheus-client's process_*, python_gc_* and python_info. Retried sequence numbers change
no token counter (nothing is decided again). Per-layer counters and the CAOTE histogram are
accumulated with numpy (one vectorised update per report, not one call per layer or token). The
CAOTE histogram's values (the exact score of each of the 32k tokens a Llama-3.1-8B-shaped report
evicts, ~13 ms of CPU on an AVX2 core) are computed on the metrics' own thread after the answer
is sent, are not part of the decision's duration, and are in every later scrape. The payload size
is the request's size as received (not a second walk of the decoded message).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvevict.cache_manager.decision import DecisionStats
from kvevict.cache_manager.errors import Aborted, InvalidArgument, NotFound, StoreUnavailable
from kvevict.metrics import (ArrayHistogram, CallbackCounter, LayerCounters, LayerGauge, RpcMetrics,
                             decade_buckets, exponential_buckets, new_registry)
from kvevict.request_decoding import wire_size
from kvevict.v1 import cache_manager_pb2 as pb

PHASES = {pb.PHASE_PREFILL: "prefill", pb.PHASE_DECODE: "decode"}
OUTCOMES = ("decided", "retry", "invalid", "aborted", "not_found", "unavailable")
_ERROR_OUTCOMES = ((InvalidArgument, "invalid"), (Aborted, "aborted"), (NotFound, "not_found"),
                   (StoreUnavailable, "unavailable"))
METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["CacheManagerService"].methods)
REDIS_OPERATIONS = ("ping", "get", "create", "update", "delete", "count")

# A decision takes microseconds to milliseconds (2 ms for a Llama-3.1-8B-shaped report).
DECISION_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
PAYLOAD_BUCKETS = exponential_buckets(1024, 2, 17)  # 1 KiB .. 64 MiB (the default message limit)
CAOTE_ERROR_BUCKETS = decade_buckets(-6, 1)  # 1e-6 .. 10, 1-2-5 per decade
# A head's budget over the uniform one: floors hold it above ~0.2, a head taking much of its
# layer reaches several times 1. 0.1 .. 10, eight buckets per decade (ratio 1.33).
HEAD_BUDGET_RATIO_BUCKETS = tuple(float(f"{10 ** (k / 8):.4g}") for k in range(-8, 9))
REDIS_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
RPC_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# CAOTE tallies queued behind the answers before report_answered computes one itself.
MAX_PENDING_TALLIES = 4


def phase_label(phase: int) -> str:
    return PHASES.get(phase, "unspecified")


def outcome_of(error: BaseException) -> str:
    return next((label for cls, label in _ERROR_OUTCOMES if isinstance(error, cls)), "error")


class ManagerMetrics:
    """Every metric of one manager process, in its own registry (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry if registry is not None else new_registry()
        self._store = None
        self.sessions_active = Gauge(
            "kvevict_manager_sessions_active",
            "Open sessions in this replica's store (with Redis: every replica's), refreshed by the health probe",
            registry=registry)
        self.sessions_opened = Counter("kvevict_manager_sessions_opened", "Sessions opened", registry=registry)
        self.sessions_closed = Counter("kvevict_manager_sessions_closed", "Sessions closed by CloseSession",
                                       registry=registry)
        registry.register(CallbackCounter(
            "kvevict_manager_sessions_expired",
            "Sessions whose TTL ran out before a CloseSession, counted when this replica pruned them",
            lambda: getattr(self._store, "expired", 0)))
        self.reports = Counter("kvevict_manager_reports", "ReportBlock calls by phase and outcome",
                               ("phase", "outcome"), registry=registry)
        for phase in PHASES.values():
            for outcome in OUTCOMES:
                self.reports.labels(phase, outcome)
        self.tokens_evaluated = LayerCounters(
            "kvevict_manager_tokens_evaluated",
            "Cached tokens (per layer, KV head and token; new tokens included) the decisions covered")
        self.tokens_evicted = LayerCounters("kvevict_manager_tokens_evicted",
                                            "Tokens evicted (per layer, KV head and token)")
        self.tokens_kept = LayerCounters("kvevict_manager_tokens_kept", "Tokens kept (per layer, KV head and token)")
        self.layer_budget = LayerGauge("kvevict_manager_layer_budget_tokens",
                                       "Tokens per KV head each layer keeps, after the latest decision")
        self.caote_error = ArrayHistogram(
            "kvevict_manager_evicted_caote_error",
            "CAOTE score (attention-output error units) of every token evicted by a caote/fastcaote session",
            CAOTE_ERROR_BUCKETS)
        self.head_budget_ratio = ArrayHistogram(
            "kvevict_manager_head_budget_ratio",
            "Budget of every (layer, KV head) of a per-head session after a decision, over BudgetSpec.tokens",
            HEAD_BUDGET_RATIO_BUCKETS)
        for collector in (self.tokens_evaluated, self.tokens_evicted, self.tokens_kept, self.layer_budget,
                          self.caote_error, self.head_budget_ratio):
            registry.register(collector)
        self.decision_seconds = Histogram("kvevict_manager_decision_duration_seconds",
                                          "Validation and decision of one report (store time excluded)",
                                          registry=registry, buckets=DECISION_BUCKETS)
        self.payload_bytes = Histogram("kvevict_manager_report_payload_bytes",
                                       "Serialized size of a ReportBlock request", registry=registry,
                                       buckets=PAYLOAD_BUCKETS)
        self.redis_seconds = Histogram("kvevict_manager_redis_operation_duration_seconds",
                                       "Time an operation spent talking to Redis", ("operation",),
                                       registry=registry, buckets=REDIS_BUCKETS)
        self.redis_errors = Counter("kvevict_manager_redis_errors", "Redis operations that failed (UNAVAILABLE)",
                                    ("operation",), registry=registry)
        self.rpcs = RpcMetrics(registry, "kvevict_manager", METHODS, RPC_BUCKETS)
        self._tallies = ThreadPoolExecutor(1, thread_name_prefix="kvevict-metrics")

    def watch_store(self, store) -> None:
        """Reads the store's `expired` tally at scrape time and, for Redis, hears its operations."""
        self._store = store
        if hasattr(store, "observer"):
            store.observer = self.redis_operation
            for operation in REDIS_OPERATIONS:
                self.redis_seconds.labels(operation)
                self.redis_errors.labels(operation)

    def redis_operation(self, operation: str, seconds: float, failed: bool) -> None:
        self.redis_seconds.labels(operation).observe(seconds)
        if failed:
            self.redis_errors.labels(operation).inc()

    def report_answered(self, request: pb.ReportBlockRequest, decision: DecisionStats | None) -> None:
        """A report answered: a new decision, or (None) a retry answered with the stored one.
        The CAOTE histogram's values (every evicted token's exact score) are computed on the
        metrics' own thread, so the answer goes out first; a scrape waits for them."""
        self.payload_bytes.observe(wire_size(request))
        self.reports.labels(phase_label(request.phase), "retry" if decision is None else "decided").inc()
        if decision is None:
            return
        self.decision_seconds.observe(decision.seconds)
        self.tokens_evaluated.add(decision.evaluated_per_layer)
        self.tokens_evicted.add(decision.evicted_per_layer)
        self.tokens_kept.add(decision.kept_per_layer)
        self.layer_budget.set(decision.layer_budgets)
        if decision.head_budget_ratios is not None:
            self.head_budget_ratio.add(decision.head_budget_ratios)
        if decision.evicted_errors is not None:
            self.caote_error.add_later(lambda: _evicted_errors(decision), self._tallies, MAX_PENDING_TALLIES)

    def report_failed(self, request: pb.ReportBlockRequest, error: BaseException) -> None:
        self.payload_bytes.observe(wire_size(request))
        self.reports.labels(phase_label(request.phase), outcome_of(error)).inc()

    def sessions_counted(self, count: int) -> None:
        self.sessions_active.set(count)


def _evicted_errors(decision: DecisionStats) -> np.ndarray:
    """Every evicted token's CAOTE score, flat (empty when the session is not CAOTE-wrapped)."""
    errors = decision.evicted_output_errors
    return np.concatenate([e.ravel() for e in errors]) if errors else np.empty(0)
