"""benchmarks/fuzz.py --quick (a few hundred requests to real servers) prints its counts per RPC
and status and finds nothing; --replay sends a saved case to fresh servers and reports a step
whose status breaks the rules, with a nonzero exit status."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NO_REDIS
from tests.servers import REDIS_SERVER

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "fuzz.py"
RPCS = ("OpenSession", "ReportBlock", "CloseSession", "GetSession", "ListPolicies", "Generate", "Score")


def _table(text: str, title: str) -> list[dict[str, str]]:
    section = text.split(f"### {title}")[1].split("\n### ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    failures = tmp_path_factory.mktemp("fuzz") / "failures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--failures", str(failures)], cwd=ROOT,
                          timeout=600, capture_output=True, text=True)
    return done, failures


def test_quick_run_counts_every_rpc_by_status_and_finds_no_failure(quick):
    done, failures = quick
    rows = {row["RPC"]: row for row in _table(done.stdout, "Status per RPC (latency: wall time of one call)")}
    assert set(RPCS) | {"**all**"} == set(rows), done.stdout[-3000:]
    for rpc in RPCS:
        assert int(rows[rpc]["requests"]) > 0, rpc
    total = int(rows["**all**"]["requests"])
    assert total >= 300 and total == sum(int(rows[rpc]["requests"]) for rpc in RPCS)
    for column in ("UNKNOWN", "INTERNAL"):
        assert column not in rows["**all**"], done.stdout
    assert json.loads(failures.read_text()) == [], done.stdout[-4000:]
    assert "No failures." in done.stdout and done.returncode == 0


def test_replay_reports_a_step_that_breaks_the_rules_and_exits_nonzero(tmp_path):
    def step(method: str, data: bytes, expected: str) -> dict:
        return {"method": method, "data": base64.b64encode(data).decode(), "role": "fuzz", "what": "", "expected": expected}

    # GetSession with no session_id is INVALID_ARGUMENT; the saved expectation says OK.
    saved = tmp_path / "case.json"
    saved.write_text(json.dumps([{"kind": "handmade", "steps": [step("ListPolicies", b"", "OK"),
                                                                step("GetSession", b"", "OK")]}]))
    done = subprocess.run([sys.executable, str(SCRIPT), "--replay", str(saved)], cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    assert "0 ListPolicies (fuzz, -, 0 B): OK" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "1 GetSession (fuzz, -, 0 B): INVALID_ARGUMENT session_id: " in done.stdout
    assert "FAILED: handmade: step 1 GetSession (fuzz): in-process ManagerCore says OK" in done.stdout
    assert "replay: 1 failures" in done.stdout and done.returncode == 1
