"""deploy/ and docker-compose.yml, checked without a Docker engine: Prometheus' config passes
promtool; the compose file validates with docker-compose and everything it mounts or builds
from exists (and survives .dockerignore); the services, Prometheus, Grafana's datasource and
dashboard provider point at each other; every dashboard panel queries the pinned datasource,
uses only the metric contract's names and labels, and rates counters (max_over_time() of gauges)
over $__rate_interval; every
contract metric is on a dashboard; the slim manager image installs everything the manager and
the load generator import (and the worker image everything the worker imports), each process
run seeing only its image's distributions; the healthcheck
script answers from the gRPC health service.

The dashboards' queries are run on a real Prometheus in tests/test_deploy_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
DATASOURCE_UID = "kvevict-prometheus"
PROMTOOL = shutil.which("promtool")
DOCKER_COMPOSE = shutil.which("docker-compose")

# The services' metric contract: name -> (type, labels). Base units, no per-session labels.
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "kvevict_manager_sessions_active": ("gauge", ()),
    "kvevict_manager_head_budget_ratio": ("histogram", ()),
    "kvevict_manager_sessions_opened_total": ("counter", ()),
    "kvevict_manager_sessions_closed_total": ("counter", ()),
    "kvevict_manager_sessions_expired_total": ("counter", ()),
    "kvevict_manager_reports_total": ("counter", ("phase", "outcome")),
    "kvevict_manager_tokens_evaluated_total": ("counter", ("layer",)),
    "kvevict_manager_tokens_evicted_total": ("counter", ("layer",)),
    "kvevict_manager_tokens_kept_total": ("counter", ("layer",)),
    "kvevict_manager_layer_budget_tokens": ("gauge", ("layer",)),
    "kvevict_manager_evicted_caote_error": ("histogram", ()),
    "kvevict_manager_decision_duration_seconds": ("histogram", ()),
    "kvevict_manager_report_payload_bytes": ("histogram", ()),
    "kvevict_manager_redis_operation_duration_seconds": ("histogram", ("operation",)),
    "kvevict_manager_redis_errors_total": ("counter", ("operation",)),
    "kvevict_manager_rpcs_total": ("counter", ("method", "code")),
    "kvevict_manager_rpc_duration_seconds": ("histogram", ("method",)),
    "kvevict_worker_requests_total": ("counter", ("method", "outcome")),
    "kvevict_worker_generated_tokens_total": ("counter", ()),
    "kvevict_worker_prompt_tokens_total": ("counter", ()),
    "kvevict_worker_evicted_tokens_total": ("counter", ()),
    "kvevict_worker_prefill_duration_seconds": ("histogram", ()),
    "kvevict_worker_decode_token_duration_seconds": ("histogram", ()),
    "kvevict_worker_decode_tokens_per_second": ("gauge", ()),
    "kvevict_worker_kv_cache_bytes": ("gauge", ()),
    "kvevict_worker_kv_cache_full_bytes": ("gauge", ()),
    "kvevict_worker_manager_round_trip_seconds": ("histogram", ()),
    "kvevict_worker_manager_retries_total": ("counter", ()),
    "kvevict_worker_manager_fallbacks_total": ("counter", ()),
    "kvevict_worker_queue_depth": ("gauge", ()),
    "kvevict_worker_rpcs_total": ("counter", ("method", "code")),
}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
HISTOGRAM_SERIES = {"_bucket": {"le"}, "_sum": set(), "_count": set()}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}


# --- helpers -----------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dashboards() -> list[tuple[str, dict]]:
    return [(path.name, json.loads(path.read_text())) for path in DASHBOARDS]


def panels(dashboard: dict) -> list[dict]:
    """Every panel, the ones inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, expr) of every target of every dashboard."""
    return [(name, panel["title"], target["refId"], target["expr"])
            for name, dashboard in dashboards() for panel in panels(dashboard) for target in panel.get("targets", [])]


def series_of(expr: str) -> tuple[list[str], set[str]]:
    """The series names an expression selects (`foo_bucket`, `bar_total`) and the labels it names
    in matchers and in by/without/on/ignoring clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    names = [m.group(1) for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text)
             if m.group(1).lower() not in PROMQL_WORDS]
    return names, labels


def contract_metric(series: str) -> tuple[str, str, set[str]]:
    """(contract name, type, labels the series has) of a series name; KeyError if not in the contract."""
    if series in CONTRACT:
        kind, labels = CONTRACT[series]
        if kind == "histogram":
            raise KeyError(f"{series} is a histogram: select its _bucket, _sum or _count series")
        return series, kind, set(labels)
    for suffix, extra in HISTOGRAM_SERIES.items():
        base = series.removesuffix(suffix)
        if base != series and CONTRACT.get(base, ("",))[0] == "histogram":
            return base, "histogram", set(CONTRACT[base][1]) | extra
    raise KeyError(f"{series} is not a metric of the contract")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        lines.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `relative` out: the last matching pattern wins, `!` re-includes,
    a pattern that matches a directory covers what is inside it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace("\0/", "(?:.*/)?").replace("\0", ".*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def command_flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --- Prometheus and compose ---------------------------------------------------------------------


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_prometheus_config_passes_promtool():
    result = subprocess.run([PROMTOOL, "check", "config", str(DEPLOY / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(DOCKER_COMPOSE is None,
                    reason="docker-compose is not installed (apt-get install docker-compose; no engine needed)")
@pytest.mark.parametrize("profile", [[], ["--profile", "loadgen"]], ids=["default", "loadgen"])
def test_compose_file_validates_with_docker_compose(profile, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL", "DEVICE", "TORCH_INDEX_URL", "COMPOSE_FILE")}
    result = subprocess.run([DOCKER_COMPOSE, "-f", str(COMPOSE), *profile, "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_everything_compose_mounts_or_builds_from_exists_and_is_in_the_build_context():
    patterns = dockerignore_patterns()
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build["context"]
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name} builds from {dockerfile}, which does not exist"
        copies = [args.split() for kind, args in dockerfile_instructions(dockerfile) if kind in ("COPY", "ADD")]
        assert copies, f"{dockerfile.name} copies nothing"
        for argv in copies:
            assert not any(a.startswith("--from") for a in argv)
            for source in argv[:-1]:
                path = context / source
                assert path.exists(), f"{dockerfile.name}: COPY {source}: no such file"
                files = [path] if path.is_file() else [
                    p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                    and not any(part.endswith(".egg-info") for part in p.parts)]
                assert files, f"{dockerfile.name}: COPY {source}: empty"
                left_out = [str(p.relative_to(context)) for p in files
                            if dockerignored(str(p.relative_to(context)), patterns)]
                assert not left_out, f"{dockerfile.name}: COPY {source}: .dockerignore leaves out {left_out[:5]}"


def test_services_prometheus_and_grafana_point_at_each_other():
    services = compose()["services"]
    assert {"redis", "cache-manager", "worker", "prometheus", "grafana", "loadgen"} <= set(services)
    manager, worker = services["cache-manager"], services["worker"]

    # The manager keeps its state in the compose Redis, which it waits for.
    assert manager["environment"]["KVEVICT_REDIS_URL"] == "redis://redis:6379/0"
    assert manager["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    manager_port = manager["environment"]["KVEVICT_MANAGER_PORT"]
    worker_port = worker["environment"]["KVEVICT_WORKER_PORT"]
    assert worker["environment"]["KVEVICT_MANAGER"] == f"cache-manager:{manager_port}"
    assert command_flag(services["loadgen"]["command"], "--worker") == f"worker:{worker_port}"
    assert services["loadgen"]["profiles"] == ["loadgen"]

    # Health checks ask the gRPC health service of the port the service listens on.
    for service, port in ((manager, manager_port), (worker, worker_port)):
        assert service["healthcheck"]["test"] == ["CMD", "python", "/opt/kvevict/bin/healthcheck.py",
                                                  f"127.0.0.1:{port}"]

    # The shipped checkpoint by default, any hub model through MODEL, its downloads in a named volume.
    assert worker["environment"]["KVEVICT_MODEL"] == "${MODEL:-/opt/kvevict/models/demo-py}"
    assert worker["environment"]["HF_HOME"] == "/cache/huggingface"
    assert "hf-cache:/cache/huggingface" in worker["volumes"] and "hf-cache" in compose()["volumes"]

    # Prometheus scrapes each service's metrics port, by its compose name.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for job, (name, service) in {"kvevict-manager": ("cache-manager", manager),
                                 "kvevict-worker": ("worker", worker)}.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [name]
        assert str(sd["port"]) == command_flag(service["command"], "--metrics-port")
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in services["prometheus"]["volumes"]

    # Grafana: the datasource is that Prometheus with the pinned uid and the scrape interval;
    # the dashboard provider reads the folder compose mounts the dashboards into.
    grafana = services["grafana"]
    (datasource,) = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/kvevict.yaml").read_text())["providers"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_dockerfiles_serve_on_every_interface_check_health_over_grpc_and_download_only_pip_packages():
    compose_services = compose()["services"]
    for name, service, port in (("manager", "cache-manager", 50051), ("worker", "worker", 50052)):
        path = DEPLOY / f"Dockerfile.{name}"
        instructions = dockerfile_instructions(path)
        assert ("ARG", "PYTHON_IMAGE=python:3.11-slim") in instructions
        assert instructions[[kind for kind, _ in instructions].index("FROM")] == ("FROM", "${PYTHON_IMAGE}")
        entrypoint = json.loads(dict(instructions)["ENTRYPOINT"])
        assert entrypoint == ["kvevict", name, "serve", "--host", "0.0.0.0"]
        healthcheck = dict(instructions)["HEALTHCHECK"]
        assert "python /opt/kvevict/bin/healthcheck.py" in healthcheck
        assert str(port) in dict(instructions)["EXPOSE"].split()
        assert compose_services[service]["build"]["dockerfile"] == f"deploy/Dockerfile.{name}"
        for kind, args in instructions:
            assert not (kind == "RUN" and re.search(r"\b(curl|wget|apt-get)\b", args)), f"{path.name}: {args}"
            assert not (kind == "ADD" and "://" in args), f"{path.name}: {args}"
    worker = dockerfile_instructions(DEPLOY / "Dockerfile.worker")
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in worker
    assert any(kind == "RUN" and '--index-url "${TORCH_INDEX_URL}"' in args for kind, args in worker)


# --- dashboards --------------------------------------------------------------------------------


def test_dashboards_are_the_output_of_their_generator():
    assert [p.name for p in DASHBOARDS] == ["eviction.json", "worker.json"]
    result = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "dashboards.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_dashboards_are_valid_grafana_json_with_fixed_uids_and_the_pinned_datasource():
    uids = set()
    for name, dashboard in dashboards():
        assert isinstance(dashboard.get("uid"), str) and dashboard["uid"], name
        uids.add(dashboard["uid"])
        assert dashboard["title"] and dashboard["schemaVersion"] >= 39, name
        cells = set()
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, f"{name}: {panel['title']}"
            covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                       for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not cells & covered, f"{name}: {panel['title']} overlaps another panel"
            cells |= covered
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, f"{name}: {panel['title']}"
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), f"{name}: {panel['title']}"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == DATASOURCE_UID and target["expr"].strip()
    assert len(uids) == len(DASHBOARDS)
    assert {d["title"] for _, d in dashboards()} == {"Eviction", "Worker"}
    # Nothing in any dashboard names another datasource.
    for path in DASHBOARDS:
        for uid in re.findall(r'"uid":\s*"([^"]+)"', path.read_text()):
            assert uid in uids | {DATASOURCE_UID, "-- Grafana --"}, f"{path.name}: uid {uid}"


@pytest.mark.parametrize("dashboard, panel, ref_id, expr", queries(), ids=lambda v: str(v)[:40])
def test_every_query_uses_contract_metrics_and_labels_and_ranges_over_rate_interval(dashboard, panel, ref_id, expr):
    names, labels = series_of(expr)
    assert names, f"no metric in {expr}"
    allowed = set(TARGET_LABELS)
    for series in names:
        base, kind, series_labels = contract_metric(series)
        allowed |= series_labels
    assert labels <= allowed, f"labels {labels - allowed} are not labels of {names}"
    for function, selector, window in re.findall(r"\b(rate|increase|irate|\w+_over_time)\(\s*([^\[(]+?)\s*\[([^\]]*)\]",
                                                 expr):
        assert window == "$__rate_interval", f"{function}() over [{window}] in {expr}"
        series = selector.split("{")[0]
        base, kind, _ = contract_metric(series)
        expected = {"rate": ("counter", "histogram"), "increase": ("counter", "histogram"),
                    "max_over_time": ("gauge",)}.get(function, ())
        assert kind in expected, f"{function}() of the {kind} {series}"
    assert re.findall(r"\[([^\]]*)\]", expr) == ["$__rate_interval"] * expr.count("[")
    for match in re.finditer(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
        assert "_bucket[" in match.group(1), expr


def test_every_contract_metric_is_on_a_dashboard():
    shown = {contract_metric(series)[0] for *_, expr in queries() for series in series_of(expr)[0]}
    assert set(CONTRACT) - shown == set()


def test_the_promql_parser_of_these_tests_finds_names_and_labels():
    names, labels = series_of('histogram_quantile(0.99, sum by (method, le) (rate(foo_bucket{code!="OK"}[5m]))) '
                              '/ on (instance) group_left bar_total or vector(0)')
    assert names == ["foo_bucket", "bar_total"]
    assert labels == {"method", "le", "code", "instance"}
    assert contract_metric("kvevict_manager_rpc_duration_seconds_bucket")[2] == {"method", "le"}
    with pytest.raises(KeyError):
        contract_metric("kvevict_manager_decision_duration_seconds")
    assert dockerignored("models/other/x.bin", ["models/*", "!models/demo-py"])
    assert not dockerignored("models/demo-py/config.json", ["models/*", "!models/demo-py"])
    assert dockerignored("kvevict/__pycache__/a.pyc", ["**/__pycache__"])


# --- images: what they install covers what the processes import ---------------------------------


def _requirements(*flags: str) -> list[str]:
    result = subprocess.run([sys.executable, str(DEPLOY / "requirements.py"), "--pyproject",
                             str(ROOT / "pyproject.toml"), *flags], capture_output=True, text=True, check=True)
    return result.stdout.split()


def _closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions these requirements install (with their dependencies,
    as installed here; extras not followed)."""
    seen, todo = set(), [Requirement(r).name for r in requirements]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


# This project's modules, and the pseudo-module Cython extensions register.
NOT_DISTRIBUTIONS = {"kvevict", "healthcheck", "loadgen", "tests", "cython_runtime"}


def _image_site(distributions: set[str], site: Path) -> Path:
    """A site directory that holds only `distributions` (links to their installed files) and
    this project's package as its wheel lays it out: what an image installing exactly those
    sees, whatever else this environment has (a module imported only when present, such as
    transformers' optional `accelerate`, is then absent as it is in the image)."""
    site.mkdir()
    for name in distributions:
        distribution = metadata.distribution(name)
        for file in distribution.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts outside site-packages; bytecode is linked with its source
            source = Path(distribution.locate_file(file))
            if source.exists():
                _link(source, site / file)
                if source.suffix == ".py" and Path(cached := importlib.util.cache_from_source(str(source))).exists():
                    _link(Path(cached), site / file.parent / "__pycache__" / Path(cached).name)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in setuptools["packages"]:
        source, target = _package_source(package, setuptools["package-dir"]), site.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for entry in source.glob("*.py"):
            _link(entry, target / entry.name)
    return site


def _package_source(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools finds `package`: under its nearest mapped ancestor in package-dir."""
    parts = package.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in package_dir:
            return ROOT.joinpath(package_dir[prefix], *parts[end:])
    return ROOT.joinpath(*parts)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(source)


def _imported_distributions(code: str, installed: set[str], site: Path) -> set[str]:
    """Distributions whose modules a Python process running `code` imported (stdlib and this
    project left out), the process seeing only the `installed` distributions (see _image_site)."""
    python = [sys.executable, "-S"]  # no site-packages of this environment; PYTHONPATH gives the image's
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(_image_site(installed, site))}
    result = subprocess.run([*python, "-c", code + "\nimport json, sys\n"
                             "print('MODULES=' + json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))"],
                            cwd=site, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    startup = subprocess.run([*python, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
                             cwd=site, capture_output=True, text=True, check=True, env=env)
    modules = set(json.loads(result.stdout.rsplit("MODULES=", 1)[1])) - {
        m.partition(".")[0] for m in json.loads(startup.stdout)}
    owners = metadata.packages_distributions()
    distributions = set()
    for module in modules:
        if module in sys.stdlib_module_names or module in NOT_DISTRIBUTIONS:
            continue
        if module not in owners:
            assert module.startswith("_") or module in sys.builtin_module_names, f"{module}: not installed by pip?"
            continue
        distributions |= {re.sub(r"[-_.]+", "-", d).lower() for d in owners[module]}
    return distributions


def _serve_until_healthy(argv: list[str], port: int) -> str:
    """Code that runs `kvevict <argv>` in process until its health is SERVING, then SIGTERMs itself."""
    return f"""
import os, signal, sys, threading, time
sys.path.insert(0, {str(DEPLOY)!r})
from healthcheck import check
def stop_when_serving():
    deadline = time.monotonic() + 240
    while check("127.0.0.1:{port}", timeout_s=1) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(os.getpid(), signal.{signal.SIGTERM.name})
threading.Thread(target=stop_when_serving, daemon=True).start()
from kvevict.cli import main
assert main({argv!r}) == 0
"""


def test_the_manager_image_installs_what_the_manager_and_the_load_generator_import_and_no_torch(tmp_path):
    requirements = _requirements("--without", "torch", "transformers", "tqdm", "gguf", "accelerate")
    installed = _closure(requirements)
    assert not {"torch", "transformers"} & installed
    port = free_port()
    manager = _imported_distributions(_serve_until_healthy(
        ["manager", "serve", "--port", str(port), "--metrics-port", "0", "--redis-url", "memory://"], port),
        installed, tmp_path / "manager")
    loadgen = _imported_distributions(
        f"import runpy; runpy.run_path({str(ROOT / 'scripts' / 'loadgen.py')!r}, run_name='loadgen')\n"
        f"import runpy; runpy.run_path({str(DEPLOY / 'healthcheck.py')!r}, run_name='healthcheck')",
        installed, tmp_path / "loadgen")
    assert "torch" not in manager
    assert manager <= installed, f"the manager imports {manager - installed}, which its image does not install"
    assert loadgen <= installed, f"the load generator imports {loadgen - installed}, not in the manager image"


def test_the_worker_image_installs_what_the_worker_imports(tmp_path):
    installed = _closure(_requirements())
    assert _requirements("--only", "torch") == [r for r in _requirements() if r.startswith("torch")]
    port = free_port()
    worker = _imported_distributions(_serve_until_healthy(
        ["worker", "serve", "--port", str(port), "--metrics-port", "0", "--model", str(ROOT / "models" / "demo-py"),
         "--threads", "1"], port), installed, tmp_path / "worker")
    assert "torch" in worker
    assert worker <= installed, f"the worker imports {worker - installed}, which its image does not install"


PROJECT_SOURCE = ("pyproject.toml", "README.md", "kvevict", "services")


def test_the_source_the_dockerfiles_copy_installs_a_package_that_runs_both_services(tmp_path):
    """The images' `pip install --no-deps .`, offline: a wheel built from exactly what they copy
    (no build isolation here), installed apart from the checkout, imports both servers and the CLI."""
    for name in ("manager", "worker"):
        copied = {source for kind, args in dockerfile_instructions(DEPLOY / f"Dockerfile.{name}") if kind == "COPY"
                  for source in args.split()[:-1]}
        assert set(PROJECT_SOURCE) <= copied, f"Dockerfile.{name} copies {copied}"
    source = tmp_path / "src"
    source.mkdir()
    for name in PROJECT_SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kvevict-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import kvevict, kvevict.cli, kvevict.cache_manager.server, kvevict.cache_manager.redis_store, "
            "kvevict.worker.server, kvevict.v1.worker_pb2_grpc; print(kvevict.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "site" / "kvevict" / "__init__.py")


# --- healthcheck ---------------------------------------------------------------------------------


def test_healthcheck_exits_0_only_when_the_service_is_serving(manager_factory):
    script = [sys.executable, str(DEPLOY / "healthcheck.py")]
    manager = manager_factory("memory://")
    serving = subprocess.run([*script, manager.address], capture_output=True, text=True, timeout=30)
    assert (serving.returncode, serving.stdout.strip()) == (0, f"{manager.address}: SERVING")
    closed = f"127.0.0.1:{free_port()}"
    refused = subprocess.run([*script, closed], capture_output=True, text=True, timeout=30)
    assert (refused.returncode, refused.stdout.strip()) == (1, f"{closed}: UNAVAILABLE")
    unknown = subprocess.run([*script, manager.address, "no.such.Service"], capture_output=True, text=True, timeout=30)
    assert (unknown.returncode, unknown.stdout.strip()) == (1, f"{manager.address}: NOT_FOUND")
