"""The `kvevict` command line on checkpoints saved to disk (a tiny random one, the shipped
models/demo-py): generate and score in process (full cache, chat, stop strings, JSON), the
defaults in --help and the README, torch device strings."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvevict import defaults
from kvevict.cli import main
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import load_model, resolve_device
from kvevict.worker.prompts import eos_token_ids
from kvevict.worker.scoring import score_tokens
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


def test_generate_with_per_head_budgets_prints_every_heads_count(checkpoint, tmp_path, capsys):
    prompt = tmp_path / "prompt.py"
    prompt.write_text(TEXT * 6)
    status = main(["generate", "--model", str(checkpoint), "--prompt-file", str(prompt), "--policy", "snapkv",
                   "--allocator", "adahead", "--head-floor", "0.25", "--budget", "16", "--block-size", "8",
                   "--max-new-tokens", "8", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    heads = [[int(n) for n in row.split()] for row in re.findall(r"^\s+\d+: ([\d ]+)$", out, flags=re.M)]
    assert len(heads) == 2 and all(len(row) == 2 and min(row) >= 4 for row in heads), out  # floor 0.25 x 16
    assert all(sum(row) == sum(heads[0]) for row in heads)  # each layer keeps its own total
    assert re.search(r"KV cache: .* used vs .* full cache .*; kept entries \d+\.\d\d MiB", out)


@pytest.mark.parametrize("flags,message", [
    (["--allocator", "lukv"], "budget.profile"),
    (["--allocator", "lukv", "--head-profile", "/no/such/profile.json"], "--head-profile: cannot read"),
    (["--allocator", "uniform", "--head-floor", "0.5"], "floor"),
])
def test_per_head_flags_that_cannot_run_exit_2_naming_them(checkpoint, capsys, flags, message):
    status = main(["generate", "--model", str(checkpoint), "--prompt", "def f():", "--no-progress", *flags])
    assert status == 2
    assert message in capsys.readouterr().err


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


# -- generate: full cache, chat, stop strings, JSON; score; defaults; devices ---------------------

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo-py"
CODE = "import os\n\n\ndef read_lines(path):\n    with open(path) as handle:\n"


def _json_run(capsys, *argv: str) -> dict:
    status = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def shipped():
    """The shipped code model as transformers loads it (stock attention, no eviction)."""
    return AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32), AutoTokenizer.from_pretrained(SHIPPED)


def test_full_cache_generation_is_transformers_greedy_generate_and_json_has_it_all(shipped, capsys):
    model, tokenizer = shipped
    got = _json_run(capsys, "generate", "--model", str(SHIPPED), "--prompt", CODE, "--full-cache",
                    "--block-size", "8", "--max-new-tokens", "16", "--no-progress")
    ids = tokenizer(CODE, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert got["token_ids"] == expected
    assert got["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert got["finish_reason"] == ("length" if len(expected) == 16 else "eos")
    assert got["policy"] == "full cache, block 8"
    summary = got["summary"]
    assert summary["prompt_tokens"] == ids.shape[1] and summary["generated_tokens"] == len(expected)
    assert summary["evicted_per_layer"] == [0] * 4 and summary["reports"] == 0
    assert summary["kv_bytes"] == summary["full_cache_bytes"] > 0


def test_full_cache_refuses_eviction_flags(capsys):
    assert main(["generate", "--model", str(SHIPPED), "--prompt", CODE, "--full-cache", "--budget", "64",
                 "--policy", "h2o"]) == 2
    assert "--full-cache evicts nothing: drop --policy, --budget" in capsys.readouterr().err


def test_stop_strings_end_the_generation_and_are_not_printed(capsys):
    argv = ["generate", "--model", str(SHIPPED), "--prompt", CODE, "--policy", "caote+h2o", "--budget", "16",
            "--block-size", "8", "--max-new-tokens", "24", "--no-progress"]
    free = _json_run(capsys, *argv)
    text = free["completion"]
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle
    cut = text.index(stop)
    stopped = _json_run(capsys, *argv, "--stop", "never produced", "--stop", stop)
    assert stopped["finish_reason"] == "stop"
    assert stopped["completion"] == text[:cut]
    assert stopped["token_ids"] == free["token_ids"][:len(stopped["token_ids"])]
    assert len(stopped["token_ids"]) < len(free["token_ids"])
    # The text form prints the same text, then the finish reason.
    assert main([*argv, "--stop", stop]) == 0
    assert capsys.readouterr().out.startswith(text[:cut] + "\n\nfinish reason: stop\n== eviction summary: caote+h2o")


def test_chat_prompt_is_rendered_with_the_chat_template(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "chat", chat_template=True)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": TEXT}]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(messages))
    got = _json_run(capsys, "generate", "--model", str(checkpoint), "--chat", str(chat), "--policy", "tova",
                    "--budget", "16", "--block-size", "8", "--max-new-tokens", "6", "--no-progress")
    model, tokenizer = load_model(str(checkpoint))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    settings = EvictionSettings(policy=pb.PolicySpec(base="tova"), budget=pb.BudgetSpec(tokens=16), block_size=8)
    expected = EvictingGenerator(model, EmbeddedManagerClient(), settings).generate(
        ids, 6, eos_token_ids=eos_token_ids(tokenizer, model))
    assert got["summary"]["prompt_tokens"] == len(ids)
    assert got["token_ids"] == expected.token_ids


def test_chat_on_a_model_without_a_chat_template_is_a_clear_error(tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "def f"}]))
    assert main(["generate", "--model", str(SHIPPED), "--chat", str(chat)]) == 2
    assert f"--chat: the tokenizer of {SHIPPED} has no chat template; give the prompt as --prompt" in \
        capsys.readouterr().err
    chat.write_text("not json")
    assert main(["generate", "--model", str(SHIPPED), "--chat", str(chat)]) == 2
    assert f"--chat: {chat} is not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--stop", ""], "--stop (stop[0]): empty stop string"),
    (["--top-p", "1.5"], "--top-p (sampling.top_p): must be in [0, 1]"),
    (["--temperature", "-1"], "--temperature (sampling.temperature): must be a finite number >= 0"),
    (["--allocator", "nope"], "--allocator (eviction.budget.allocator): unknown allocator 'nope'"),
])
def test_bad_request_fields_are_named_by_their_flag(capsys, flags, message):
    assert main(["generate", "--model", str(SHIPPED), "--prompt", CODE, *flags]) == 2
    assert message in capsys.readouterr().err


def test_score_with_the_full_cache_is_a_plain_forward_and_under_eviction_the_workers_scoring(shipped, capsys):
    model, tokenizer = shipped
    text = (Path(__file__).resolve().parents[1] / "examples" / "demo_prompt.py").read_text()[:600]
    ids = tokenizer(text).input_ids
    full = _json_run(capsys, "score", "--model", str(SHIPPED), "--text", text, "--full-cache", "--block-size", "16")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    got = np.array(full["token_logprobs"], dtype=np.float32)
    assert full["scored_tokens"] == len(ids) - 1 and np.abs(got - expected).max() < 1e-4
    assert math.isclose(full["total_logprob"], float(got.astype(np.float64).sum()), rel_tol=1e-6)
    assert math.isclose(full["perplexity"], math.exp(-full["total_logprob"] / (len(ids) - 1)), rel_tol=1e-6)
    assert full["summary"]["evicted_per_layer"] == [0] * 4 and full["summary"]["reports"] == 0

    evicting = _json_run(capsys, "score", "--model", str(SHIPPED), "--text", text, "--policy", "caote+h2o",
                         "--budget", "32", "--block-size", "16")
    loaded, _ = load_model(str(SHIPPED))
    in_process = score_tokens(loaded, EmbeddedManagerClient(), EvictionSettings(
        policy=pb.PolicySpec(base="h2o", wrapper="caote"), budget=pb.BudgetSpec(tokens=32), block_size=16),
        torch.tensor(ids))
    assert evicting["token_logprobs"] == in_process.token_logprobs.tolist()
    assert sum(evicting["summary"]["evicted_per_layer"]) > 0 and evicting["policy"].startswith("caote+h2o, budget 32")
    # The text form: the lines `kvevict client score` prints.
    assert main(["score", "--model", str(SHIPPED), "--text", text, "--full-cache"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^tokens scored: {len(ids) - 1}$", out, flags=re.M)
    assert re.search(rf"^perplexity: {full['perplexity']:.4f}$", out, flags=re.M)


@pytest.mark.parametrize("command", [["generate"], ["score"], ["client", "generate"], ["client", "score"],
                                     ["worker", "serve"]])
def test_help_shows_the_eviction_defaults(command):
    shown = subprocess.run([sys.executable, "-m", "kvevict.cli", *command, "--help"], capture_output=True,
                           text=True, check=True).stdout
    options = re.split(r"\n(?=  -)", shown)  # one block per option: its line and its help's lines
    for flag, value in (("--policy", defaults.BASE), ("--budget", defaults.BUDGET_TOKENS),
                        ("--block-size", defaults.BLOCK_SIZE), ("--allocator", defaults.ALLOCATOR)):
        (block,) = [b for b in options if b.startswith(f"  {flag} ")]
        assert re.search(rf"\(default: {value}\)$", " ".join(block.split())), (flag, block)


def test_the_readme_states_the_defaults():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    generate = " ".join(readme.split("## Generate", 1)[1].split("\n## ", 1)[0].split())
    for flag, value in (("--policy", defaults.BASE), ("--budget", defaults.BUDGET_TOKENS),
                        ("--block-size", defaults.BLOCK_SIZE), ("--allocator", defaults.ALLOCATOR)):
        assert re.search(rf"`{flag}[^`]*` \(default `{value}`", generate), flag


def test_any_torch_device_string_is_accepted_when_it_exists_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.device("cpu", 0)
    with pytest.raises(ValueError, match=r"^--device: 'bogus' is not a torch device"):
        resolve_device("bogus")
    for kind in ("cuda", "mps", "xpu"):
        backend = getattr(torch, kind)
        if backend.is_available():
            count = backend.device_count()
            assert resolve_device(f"{kind}:{count - 1}") == torch.device(kind, count - 1)
            with pytest.raises(ValueError, match=rf"^--device {kind}:{count}: this machine has {count} {kind}"):
                resolve_device(f"{kind}:{count}")
        else:
            unusable = rf"^--device {kind}:1: torch sees no {kind} device .*usable here: cpu"
            with pytest.raises(ValueError, match=unusable):
                resolve_device(f"{kind}:1")


def test_an_unusable_device_fails_before_the_model_loads(capsys):
    missing = "mps" if not torch.backends.mps.is_available() else "cuda:64"
    assert main(["generate", "--model", "no/such-model", "--prompt", "x", "--device", missing]) == 2
    assert f"--device {missing}: " in capsys.readouterr().err
