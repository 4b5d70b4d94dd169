"""The `kvevict` command line on a checkpoint saved to disk (loaded with from_pretrained)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kvevict.cli import main
from tests.checkpoints import TEXT, save_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


def test_generate_prints_text_and_an_eviction_summary(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.py"
    prompt.write_text(TEXT * 6)
    status = main(["generate", "--model", str(checkpoint), "--prompt-file", str(prompt), "--policy", "tova",
                   "--wrapper", "caote", "--budget", "16", "--block-size", "8", "--max-new-tokens", "12",
                   "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0
    assert "== eviction summary: caote+tova, budget 16 (uniform), block 8 ==" in out
    rows = re.findall(r"^\s+(\d+)\s+16\s+(\d+)\s+(\d+)\s+(\d+)$", out, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1]
    assert all(int(evicted) > 0 and 16 <= int(cached) <= 24 for _, evicted, cached, _ in rows)
    assert re.search(r"KV cache: .* used vs .* full cache \((\d+\.\d)% saved", out)


@pytest.mark.parametrize("flags,field", [(["--policy", "nope"], "--policy: 'nope': unknown base policy"),
                                         (["--policy", "h2o+caote"], "--policy: 'h2o+caote': the wrapper comes first"),
                                         (["--wrapper", "caote", "--budget", "0"], "budget.tokens"),
                                         (["--sink", "40", "--budget", "16"], "policy.sink_tokens")])
def test_bad_settings_exit_2_naming_the_field(checkpoint, capsys, flags, field):
    status = main(["generate", "--model", str(checkpoint), "--prompt", "def f():", "--no-progress", *flags])
    assert status == 2
    assert field in capsys.readouterr().err


def test_policies_lists_every_base_wrapper_and_allocator():
    listing = subprocess.run([sys.executable, "-m", "kvevict.cli", "policies"], capture_output=True, text=True,
                             check=True).stdout
    for name in ("h2o", "tova", "snapkv", "keydiff", "streaming", "random", "caote", "fastcaote", "uniform"):
        assert re.search(rf"^\w+\s+{name}\s", listing, flags=re.M), name
