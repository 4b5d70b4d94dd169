"""benchmarks/load.py --quick: 64 sessions against one manager and against two replicas on one
Redis, and 64 concurrent Generate calls against a worker's queue (64 and 16 long). No timing is
judged (the figures are read from the tables); what must hold on any machine is: no call failed,
every session's state was in Redis and left nothing behind, and a short queue refuses exactly
the calls that do not fit while the rest succeed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NO_REDIS
from tests.servers import REDIS_SERVER

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS)

ROOT = Path(__file__).resolve().parent.parent


def _rows(text: str, title: str) -> list[dict[str, str]]:
    """The rows of the first table of a section, by column name."""
    section = text.split(f"### {title}")[1]
    lines = []
    for line in section.splitlines():
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in lines[2:]]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[int, str]:
    out = tmp_path_factory.mktemp("load") / "load.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, out.read_text()


def test_sessions_against_one_and_two_replicas_report_without_errors_and_leave_no_keys(quick):
    status, text = quick
    rows = _rows(text, "Sessions against the cache manager")
    assert [row["setup"] for row in rows] == ["1 manager, one Redis", "2 managers, one Redis"]
    for row in rows:
        assert row["sessions"] == "64" and int(row["reports"]) > 64, row  # every session reported, more than once
        assert row["errors"] == "0", row
        assert float(row["Redis KiB / session (median)"]) > 0, row  # the states were in Redis...
        assert row["sessions with keys left after close"] == "0", row  # ...and closing removed them
        assert float(row["manager CPU s"]) > 0 and float(row["p99 ms"]) >= float(row["p50 ms"]) > 0, row
    assert "load average" in text
    assert status == 0


def test_a_short_worker_queue_refuses_what_does_not_fit_and_serves_the_rest(quick):
    status, text = quick
    rows = {row["--max-queue"]: row for row in _rows(text, "A worker's queue under 64 concurrent Generate calls")}
    assert set(rows) == {"64", "16"}
    assert (rows["64"]["OK"], rows["64"]["RESOURCE_EXHAUSTED"], rows["64"]["other errors"]) == ("64", "0", "0")
    short = rows["16"]
    # 64 calls at once: the running one and 16 waiting are served; later arrivals may find room.
    assert int(short["OK"]) >= 17 and int(short["RESOURCE_EXHAUSTED"]) > 0 and short["other errors"] == "0"
    assert int(short["OK"]) + int(short["RESOURCE_EXHAUSTED"]) == 64
    assert 0 < int(short["max queue depth"]) <= 16 < int(rows["64"]["max queue depth"]) <= 63
    assert status == 0
