"""No dead panels: every PromQL expression of every Grafana dashboard returns data from a real
Prometheus scraping a real manager (state in a real redis-server) and a real worker.

The services run as processes with `--metrics-port 0`; Prometheus runs with deploy/prometheus.yml,
its jobs pointed at those ports and scraping every second. The load is what the compose stack's
`loadgen` sends (scripts/loadgen.py, CAOTE-wrapped policies that evict), plus one bad request,
then a Redis outage during which the worker fails open. Then each expression, with Grafana's
variables substituted, goes through /api/v1/query while Redis is still down (the dashboards must
work when they are needed most): now, it must return at least one series with a finite value (a
stat panel); over the run, a value above 0 (a time series panel that moved: requests queue, a
session is left to expire, so even those panels move).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2, worker_pb2_grpc
from tests.servers import (ServerProcess, channel, free_port, manager_stub, metrics_port, start_manager,
                           wait_until)
from tests.test_deploy_config import DEPLOY, queries
from tests.test_manager_support import open_request
from tests.test_worker_service import WORKER_READY, worker_argv

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "demo-py"
PER_HEAD_PROMPT = (ROOT / "examples" / "demo_prompt.py").read_text()[:600]
PROMETHEUS = shutil.which("prometheus")
PROMETHEUS_READY = re.compile(r"Server is ready to receive web requests")
# What Grafana puts in place of its variables. $__rate_interval is at least four scrapes; two
# minutes keeps all of this test's load inside every window, however slow the machine.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "5s", "$__range": "5m"}
RUN_WINDOW = "3m"  # longer than the whole run: what a time series panel over the run shows
SESSION_TTL_S = 3
# Three senders: while two requests wait behind the running one, the queue is not empty. Each
# generation is long enough (about a second on the demo model) for 1 s scrapes to see its cache:
# the KV gauges are non-zero only while a generation holds one.
LOAD = ["--requests", "6", "--concurrency", "3", "--interval", "0", "--max-new-tokens", "192", "--budget", "32",
        "--block-size", "16", "--min-chars", "200", "--max-chars", "600",
        "--policies", "caote+h2o,caote+tova,fastcaote+snapkv"]
OUTAGE_LOAD = ["--requests", "1", "--interval", "0", "--max-new-tokens", "24", "--budget", "32", "--block-size", "16",
               "--min-chars", "200", "--max-chars", "600", "--policies", "caote+h2o"]


def prometheus_config(ports: dict[str, int], path: Path) -> Path:
    """deploy/prometheus.yml with each kvevict job pointed at 127.0.0.1:<port>, scraping every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in ports]
    assert {job["job_name"] for job in jobs} == set(ports), "deploy/prometheus.yml lost a kvevict job"
    for job in jobs:
        job.pop("dns_sd_configs")
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config["scrape_configs"] = jobs
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, process: ServerProcess, port: int) -> None:
        self.process, self.port = process, port

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:  # 400: a bad expression, with Prometheus' reason
            body = json.load(error)
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def start_prometheus(config: Path, directory: Path) -> Prometheus:
    port = free_port()
    process = ServerProcess([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={directory}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=info"],
                            PROMETHEUS_READY, name="prometheus")
    try:
        process.wait_ready(60)
    except BaseException:
        process.kill()
        raise
    return Prometheus(process, port)


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def run_loadgen(worker_address: str, *flags: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadgen.py"), "--worker", worker_address,
                             "--wait", "60", "--timeout", "120", *flags],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stderr


def healthcheck(address: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), address],
                            capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout.strip()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")
def test_every_dashboard_query_returns_data_from_prometheus_scraping_the_real_services(redis_server, tmp_path):
    manager = worker = prometheus = None
    try:
        manager = start_manager(redis_server.url, "--metrics-port", "0", "--session-ttl", str(SESSION_TTL_S))
        worker = ServerProcess(worker_argv(MODEL, "--manager", manager.address, "--metrics-port", "0",
                                           "--manager-timeout", "2", "--manager-retries", "1"),
                               WORKER_READY, name="worker")
        worker.wait_ready(120)
        worker_address = f"127.0.0.1:{worker.match.group(1)}"
        ports = {"kvevict-manager": metrics_port(manager), "kvevict-worker": metrics_port(worker)}
        prometheus = start_prometheus(prometheus_config(ports, tmp_path / "prometheus.yml"), tmp_path / "tsdb")
        wait_until(lambda: prometheus.value("sum(up)") == 2.0, 60, 0.5, "Prometheus scraping both services")

        # A session whose worker never comes back: it expires after SESSION_TTL_S.
        with channel(manager.address) as chan:
            manager_stub(chan).OpenSession(open_request(), timeout=30)
        # Load: generations that evict, through worker -> manager -> Redis.
        log = run_loadgen(worker_address, *LOAD)
        assert log.count("status=OK") == 6 and "fail_open=False" in log and "fail_open=True" not in log, log
        # A per-head session (each KV head its own budget): the head budget panel's histogram.
        with channel(worker_address) as chan:
            per_head = worker_pb2.GenerateRequest(text=PER_HEAD_PROMPT, max_new_tokens=24, eviction=worker_pb2.EvictionOptions(
                policy=pb.PolicySpec(base="snapkv"), budget=pb.BudgetSpec(tokens=32, allocator="adahead"), block_size=16))
            summary = list(worker_pb2_grpc.WorkerServiceStub(chan).Generate(per_head, timeout=120))[-1].summary
            assert len(set(summary.final_head_lengths)) > 1 and not summary.manager_fallback
        # One bad request: an unknown policy is INVALID_ARGUMENT, and the worker goes on serving.
        with channel(worker_address) as chan:
            bad = worker_pb2.GenerateRequest(text="def f(x):", eviction=worker_pb2.EvictionOptions(
                policy=pb.PolicySpec(base="no-such-policy"), budget=pb.BudgetSpec(tokens=32)))
            with pytest.raises(grpc.RpcError) as error:
                list(worker_pb2_grpc.WorkerServiceStub(chan).Generate(bad, timeout=60))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_until(lambda: (prometheus.value("sum(kvevict_manager_sessions_expired_total)") or 0) > 0,
                   30, 0.5, "the abandoned session to expire")
        wait_until(lambda: (prometheus.value("max_over_time(kvevict_worker_queue_depth[3m])") or 0) > 0,
                   10, 0.5, "a scrape of the worker while requests were queued")
        # Redis goes away: the manager answers UNAVAILABLE, the worker retries, then fails open.
        redis_server.stop()
        log = run_loadgen(worker_address, *OUTAGE_LOAD)
        assert "fail_open=True" in log, log
        # The image's health check fails once the manager's probe has seen Redis gone (1 s probes).
        wait_until(lambda: healthcheck(manager.address) == (1, f"{manager.address}: NOT_SERVING"), 15, 0.5,
                   "deploy/healthcheck.py to report the manager NOT_SERVING")

        # Everything above has been scraped once the last of it has.
        wait_until(lambda: (prometheus.value("sum(kvevict_worker_manager_fallbacks_total)") or 0) > 0
                   and (prometheus.value("sum(kvevict_manager_redis_errors_total)") or 0) > 0,
                   30, 0.5, "the outage in Prometheus")
        time.sleep(2.5)  # a couple more scrapes of both services
        assert prometheus.value("min(up)") == 1.0, "a /metrics page failed while Redis was down"

        # Each expression now (a stat panel) and at every second of the run (a time series panel).
        dead, rows = [], []
        for dashboard, panel, ref_id, expr in queries():
            query = substitute(expr)
            now = prometheus.query(query)
            finite = [float(s["value"][1]) for s in now if math.isfinite(float(s["value"][1]))]
            peaks = [float(s["value"][1]) for s in prometheus.query(f"max_over_time(({query})[{RUN_WINDOW}:1s])")]
            peak = max((v for v in peaks if math.isfinite(v)), default=math.nan)
            rows.append(f"{dashboard:14} {panel[:38]:38} {ref_id} {len(now):2} series, now {len(finite)} finite, "
                        f"peak {peak:.4g}")
            if not finite or not peak > 0:
                dead.append(f"{dashboard} / {panel} / {ref_id}: {expr} -> now {now}, peak {peak}")
        print("\n" + "\n".join(rows))
        assert not dead, "dead panels:\n" + "\n".join(dead)
    finally:
        for process in (prometheus.process if prometheus else None, worker, manager):
            if process is not None:
                process.kill()
