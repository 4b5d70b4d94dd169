"""Writes the Grafana dashboards of deploy/grafana/dashboards/ (the JSON is generated: edit here).

    python deploy/grafana/dashboards.py           # rewrite eviction.json and worker.json
    python deploy/grafana/dashboards.py --check   # exit 1 if the JSON files differ from this

Every panel queries the provisioned Prometheus datasource by its fixed uid, every rate() (and
max_over_time() of the gauges that drop to 0 between requests) spans Grafana's $__rate_interval (at least four scrapes), and every expression uses only the metric
names of the services' contract (tests/test_deploy_config.py checks all three, and
tests/test_deploy_prometheus.py runs every expression on a real Prometheus scraping real services).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "kvevict-prometheus"}
DIRECTORY = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"


@dataclass
class Target:
    expr: str
    legend: str


def rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}[{RATE}]))"


def peak(gauge: str) -> str:
    """The largest value of a gauge in each window (a gauge that drops back to 0 between scrapes)."""
    return f"max_over_time({gauge}[{RATE}])"


def quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket[{RATE}])))"


def quantiles(histogram: str, qs: tuple[float, ...] = (0.5, 0.99), mean: bool = False) -> list[Target]:
    targets = [Target(quantile(q, histogram), f"p{q * 100:g}") for q in qs]
    if mean:
        targets.append(Target(f"{rate(histogram + '_sum')} / {rate(histogram + '_count')}", "mean"))
    return targets


@dataclass
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    height: int = 8


def row(title: str) -> str:
    return title


class Dashboard:
    """Lays panels out left to right, wrapping at 24 columns; a row title starts a new line."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[dict] = []
        self._x = self._y = self._row_height = 0

    def add(self, *items: Panel | str) -> Dashboard:
        for item in items:
            if isinstance(item, str):
                self._newline()
                self.panels.append({"type": "row", "title": item, "collapsed": False, "panels": [],
                                    "id": len(self.panels) + 1, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y}})
                self._y += 1
                continue
            if self._x + item.width > 24:
                self._newline()
            self.panels.append(self._panel(item, {"h": item.height, "w": item.width, "x": self._x, "y": self._y}))
            self._x += item.width
            self._row_height = max(self._row_height, item.height)
        return self

    def _newline(self) -> None:
        self._y += self._row_height
        self._x = self._row_height = 0

    def _panel(self, panel: Panel, grid: dict) -> dict:
        targets = [{"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": t.expr, "legendFormat": t.legend,
                    "range": True, "instant": False, "editorMode": "code"} for i, t in enumerate(panel.targets)]
        common = {"id": len(self.panels) + 1, "type": panel.kind, "title": panel.title,
                  "description": panel.description, "datasource": DATASOURCE, "gridPos": grid, "targets": targets}
        if panel.kind == "stat":
            return {**common,
                    "fieldConfig": {"defaults": {"unit": panel.unit, "decimals": 2, "color": {"mode": "thresholds"},
                                                 "thresholds": {"mode": "absolute",
                                                                "steps": [{"color": "blue", "value": None}]}},
                                    "overrides": []},
                    "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                "colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                                "orientation": "auto", "textMode": "auto", "wideLayout": True,
                                "showPercentChange": False}}
        return {**common,
                "fieldConfig": {"defaults": {"unit": panel.unit, "min": 0, "color": {"mode": "palette-classic"},
                                             "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10,
                                                        "showPoints": "never", "spanNulls": True,
                                                        "axisSoftMin": 0}},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}}

    def json(self) -> dict:
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "id": None,
            "tags": ["kvevict"], "timezone": "browser", "editable": False, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
            "templating": {"list": []},
            "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                      "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                      "name": "Annotations & Alerts", "type": "dashboard"}]},
            "links": [{"type": "dashboards", "tags": ["kvevict"], "title": "kvevict", "asDropdown": False,
                       "includeVars": False, "keepTime": True, "targetBlank": False}],
            "panels": self.panels,
        }


def stat(title: str, description: str, expr: str, unit: str = "short") -> Panel:
    return Panel(title, description, [Target(expr, title)], unit=unit, kind="stat", width=6, height=4)


M = "kvevict_manager_"
W = "kvevict_worker_"


def eviction() -> Dashboard:
    kept_ratio = f"{rate(M + 'tokens_kept_total')} / {rate(M + 'tokens_evaluated_total')}"
    return Dashboard("kvevict-eviction", "Eviction",
                     "The cache manager: what it evicts, per-layer budgets, the CAOTE error of what it evicts, "
                     "how fast it decides, sessions, gRPC and Redis.").add(
        row("Overview"),
        stat("Active sessions", "Sessions open in the state store, as the manager replicas report them.",
             f"max(kvevict_manager_sessions_active)"),
        stat("Kept / evaluated", "Share of the tokens the manager scored that it kept (all layers).",
             kept_ratio, "percentunit"),
        stat("Decision p99", "99th percentile of the time to decide one report (validate, score, select).",
             quantile(0.99, M + "decision_duration_seconds"), "s"),
        stat("Reports / s", "ReportBlock requests decided per second, all phases and outcomes.",
             rate(M + "reports_total"), "reqps"),
        row("Eviction"),
        Panel("Evicted tokens / s by layer",
              "Tokens evicted per second in each layer (summed over KV heads and sessions).",
              [Target(rate(M + "tokens_evicted_total", "layer"), "layer {{layer}}")], "short"),
        Panel("Per-layer budget",
              "Budget of each layer in the latest decision: tokens kept per KV head. Uniform budgets are one line; "
              "pyramid and adaptive allocators spread them.",
              [Target("max by (layer) (kvevict_manager_layer_budget_tokens)", "layer {{layer}}")], "short"),
        Panel("Kept / evaluated by layer",
              "Of the tokens each layer's reports carried, the share kept (rate of kept / rate of evaluated).",
              [Target(f"{rate(M + 'tokens_kept_total', 'layer')} / {rate(M + 'tokens_evaluated_total', 'layer')}",
                      "layer {{layer}}")], "percentunit"),
        Panel("CAOTE error of evicted tokens",
              "Quantiles of a_j / (1 - a_j) * ||v_j - o|| over the evicted tokens: the attention-output change "
              "each eviction causes (output units, comparable across heads and layers).",
              quantiles(M + "evicted_caote_error", (0.5, 0.9, 0.99), mean=True), "short"),
        Panel("Head budget / uniform budget",
              "Per-head sessions (allocators adahead, global, lukv): quantiles over every (layer, KV head) and "
              "decision of the head's budget divided by BudgetSpec.tokens. 1 is the uniform share; the floor "
              "holds the low end near 0.2, heads that collect their layer's budget reach several times 1.",
              quantiles(M + "head_budget_ratio", (0.1, 0.5, 0.9)), "short"),
        row("Decisions"),
        Panel("Decision latency", "Time to decide one report, in process (not the network).",
              quantiles(M + "decision_duration_seconds", (0.5, 0.99), mean=True), "s"),
        Panel("Report payload size", "Size of one ReportBlock request (the packed statistics of every layer).",
              quantiles(M + "report_payload_bytes", (0.5, 0.99), mean=True), "bytes"),
        Panel("Reports by phase and outcome", "ReportBlock requests per second by phase (prefill, decode) "
              "and outcome.",
              [Target(rate(M + "reports_total", "phase, outcome"), "{{phase}} {{outcome}}")], "reqps"),
        Panel("Sessions opened, closed and expired",
              "Sessions per second: opened by workers, closed by them, expired by TTL (a worker that went away).",
              [Target(rate(M + "sessions_opened_total"), "opened"),
               Target(rate(M + "sessions_closed_total"), "closed"),
               Target(rate(M + "sessions_expired_total"), "expired")], "ops"),
        row("gRPC and Redis"),
        Panel("RPCs by method and code", "Calls per second that CacheManagerService answered, by status code.",
              [Target(rate(M + "rpcs_total", "method, code"), "{{method}} {{code}}")], "reqps"),
        Panel("RPC latency p99 by method", "99th percentile of the server-side time of each method.",
              [Target(quantile(0.99, M + "rpc_duration_seconds", "method"), "{{method}}")], "s"),
        Panel("Redis latency p99 by operation", "99th percentile of each state-store operation on Redis.",
              [Target(quantile(0.99, M + "redis_operation_duration_seconds", "operation"), "{{operation}}")], "s"),
        Panel("Redis errors by operation",
              "Failed Redis operations per second (the manager answers UNAVAILABLE and goes NOT_SERVING).",
              [Target(rate(M + "redis_errors_total", "operation"), "{{operation}}")], "ops"),
    )


def worker() -> Dashboard:
    # The KV gauges count the requests in flight (0 when idle): a scrape can fall between two
    # requests, so the panels show each window's peak, and a ratio only where a cache was held.
    held, full = peak(W + "kv_cache_bytes"), peak(W + "kv_cache_full_bytes")
    saved = f"1 - sum({held}) / (sum({full}) > 0)"
    return Dashboard("kvevict-worker", "Worker",
                     "The worker: tokens per second, prefill and decode latency, the KV memory eviction saves, "
                     "the round trip to the cache manager, retries and fail-opens, the queue.").add(
        row("Overview"),
        stat("Generated tokens / s", "Tokens generated per second, all workers.",
             rate(W + "generated_tokens_total"), "short"),
        stat("KV memory saved", "1 - peak KV cache bytes held / peak bytes a full cache would hold, all workers.",
             saved, "percentunit"),
        stat("Queue depth", "Requests waiting behind the running one, all workers.",
             "sum(kvevict_worker_queue_depth)", "short"),
        stat("Fail-opens / s", "Reports decided in-process because the manager stayed unreachable.",
             rate(W + "manager_fallbacks_total"), "ops"),
        row("Throughput"),
        Panel("Tokens / s", "Prompt tokens prefilled, tokens generated and tokens evicted per second.",
              [Target(rate(W + "generated_tokens_total"), "generated"),
               Target(rate(W + "prompt_tokens_total"), "prompt"),
               Target(rate(W + "evicted_tokens_total"), "evicted")], "short"),
        Panel("Decode speed", "Tokens per second of each worker's latest generation.",
              [Target("max by (instance) (kvevict_worker_decode_tokens_per_second)", "{{instance}}")], "short"),
        Panel("Requests by outcome", "Requests per second by method and outcome.",
              [Target(rate(W + "requests_total", "method, outcome"), "{{method}} {{outcome}}")], "reqps"),
        Panel("Queue depth", "Requests waiting behind the running one, per worker.",
              [Target("max by (instance) (kvevict_worker_queue_depth)", "{{instance}}")], "short"),
        row("Latency"),
        Panel("Prefill latency", "Time to prefill one prompt (all its blocks and their reports).",
              quantiles(W + "prefill_duration_seconds", (0.5, 0.99), mean=True), "s"),
        Panel("Decode latency per token", "Time to generate one token (with its share of the reports).",
              quantiles(W + "decode_token_duration_seconds", (0.5, 0.99), mean=True), "s"),
        Panel("Manager round trip", "Time of one call to the cache manager, seen by the worker (network included).",
              quantiles(W + "manager_round_trip_seconds", (0.5, 0.99), mean=True), "s"),
        Panel("Manager retries and fail-opens", "Manager calls retried (UNAVAILABLE, deadline) and sessions that "
              "went on in-process because the manager stayed unreachable, per second.",
              [Target(rate(W + "manager_retries_total"), "retries"),
               Target(rate(W + "manager_fallbacks_total"), "fail-opens")], "ops"),
        row("KV memory"),
        Panel("KV cache bytes vs full cache",
              "Peak key and value bytes held by the requests in flight, the peak a cache without eviction "
              "would have held, and the difference: memory saved (all workers, peak of each rate window).",
              [Target(f"sum({held})", "held"), Target(f"sum({full})", "full cache"),
               Target(f"sum({full}) - sum({held})", "saved")], "bytes"),
        Panel("KV memory saved", "1 - peak held / peak full cache, per worker (no point while a worker is idle).",
              [Target(f"1 - max by (instance) ({held}) / (max by (instance) ({full}) > 0)", "{{instance}}")],
              "percentunit"),
        row("gRPC"),
        Panel("RPCs by method and code", "Calls per second that WorkerService answered, by status code.",
              [Target(rate(W + "rpcs_total", "method, code"), "{{method}} {{code}}")], "reqps", width=24),
    )


DASHBOARDS = {"eviction.json": eviction, "worker.json": worker}


def render(build) -> str:
    return json.dumps(build().json(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = DIRECTORY / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run python deploy/grafana/dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
