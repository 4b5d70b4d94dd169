"""docs/API.md: every example runs as written (the services' examples against servers started
here, at the addresses the examples name), and every public name of `kvevict` is documented."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import kvevict
from tests.test_worker_service import _connect, start_workers, worker_argv

API = Path(__file__).resolve().parent.parent / "docs" / "API.md"
BLOCKS = re.findall(r"```(python|sh)\n(.*?)```", API.read_text(), flags=re.S)
MANAGER, WORKER = "localhost:50051", "localhost:50052"  # as the examples write them


@pytest.fixture(scope="module")
def worker():
    (process,) = start_workers(worker_argv(Path("models/demo-py")))
    connected = _connect(process)
    yield connected.address
    connected.channel.close()
    process.kill()


def test_every_public_name_is_documented():
    text = API.read_text()
    assert kvevict.__all__ and all(f"`kvevict.{name}`" in text for name in kvevict.__all__)
    assert sum(kind == "python" for kind, _ in BLOCKS) >= 8


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, request, tmp_path):
    kind, code = BLOCKS[index]
    if MANAGER in code:
        code = code.replace(MANAGER, request.getfixturevalue("manager_factory")("memory://").address)
    if WORKER in code:
        code = code.replace(WORKER, request.getfixturevalue("worker"))
    if kind == "python":
        exec(compile(code, f"{API.name} example {index}", "exec"), {"__name__": "__main__"})
        return
    command = code.replace("\\\n", " ").replace(".venv/bin/kvevict", f"{shlex.quote(sys.executable)} -m kvevict.cli")
    command = command.replace("/tmp/kvevict-eval", shlex.quote(str(tmp_path / "eval")))
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
