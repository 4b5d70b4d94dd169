"""One spelling of a policy (`caote+h2o`): every base x wrapper round-trips through format and
parse; reversed, redundant or unknown spellings are refused naming the option; and the producers
(summary titles, benchmark rows, load-generator requests and logs) and parsers (`--policy`,
`--policies`) all speak it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.cache_manager.wrappers import WRAPPERS
from kvevict.cli_options import add_eviction_flags, policy_label, policy_spec
from kvevict.evaluation.runner import EvictionConfig
from kvevict.policy_names import format_policy, parse_policies, parse_policy
from tests.script_loader import load_script

LOADGEN = Path(__file__).resolve().parents[1] / "scripts" / "loadgen.py"
EVERY_POLICY = [(base, wrapper) for base in BASE_POLICIES for wrapper in WRAPPERS]


@pytest.mark.parametrize("base,wrapper", EVERY_POLICY)
def test_every_base_and_wrapper_round_trips(base, wrapper):
    text = format_policy(base, wrapper)
    assert text == (base if wrapper == "none" else f"{wrapper}+{base}")
    assert parse_policy(text) == (base, wrapper)
    assert format_policy(*parse_policy(text)) == text


@pytest.mark.parametrize("text,hint", [
    ("h2o+caote", "the wrapper comes first: 'caote+h2o'"),
    ("none+h2o", "write the base alone: 'h2o'"),
    ("caote+fastcaote+h2o", "more than one '+'"),
    ("zap+h2o", "unknown wrapper 'zap'"),
    ("h2o+tova", "unknown wrapper 'h2o'"),
    ("caote+nope", "unknown base policy 'nope'"),
    ("nope", "unknown base policy 'nope'"),
    ("", "unknown base policy ''"),
    (" tova", "unknown base policy ' tova'"),
    ("CAOTE+H2O", "unknown wrapper 'CAOTE'"),
])
def test_a_bad_spelling_is_refused_naming_the_option_and_the_fix(text, hint):
    with pytest.raises(ValueError) as raised:
        parse_policy(text, "--policies")
    assert str(raised.value).startswith(f"--policies: {text!r}")
    assert hint in str(raised.value)


def test_a_list_of_policies_parses_each_and_refuses_empty_items():
    assert parse_policies("caote+h2o,tova") == [("h2o", "caote"), ("tova", "none")]
    for text in ("caote+h2o,", ",tova", "tova,,h2o"):
        with pytest.raises(ValueError, match="^--policies: empty policy"):
            parse_policies(text)


def _eviction_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eviction_flags(parser)
    return parser.parse_args(list(flags))


def test_the_cli_reads_and_writes_the_one_spelling():
    for flags in (["--policy", "caote+h2o"], ["--policy", "h2o", "--wrapper", "caote"]):
        args = _eviction_args(*flags, "--budget", "64")
        spec = policy_spec(args)
        assert (spec.base, spec.wrapper) == ("h2o", "caote")
        assert policy_label(args) == "caote+h2o, budget 64 (uniform), block 128"
    assert policy_label(_eviction_args()) == "tova, budget 512 (uniform), block 128"
    with pytest.raises(ValueError, match=r"^--policy: 'h2o\+caote': the wrapper comes first"):
        policy_spec(_eviction_args("--policy", "h2o+caote"))
    with pytest.raises(ValueError, match="^--wrapper fastcaote: .* give the wrapper once"):
        policy_spec(_eviction_args("--policy", "caote+h2o", "--wrapper", "fastcaote"))


def test_benchmark_rows_are_named_in_the_one_spelling():
    assert EvictionConfig(base="h2o", wrapper="caote").name == "caote+h2o"
    assert EvictionConfig(base="snapkv").name == "snapkv"


def test_the_load_generator_parses_and_logs_the_one_spelling(capsys):
    loadgen = load_script(LOADGEN)
    args = loadgen.parse_args([])
    specs = [(spec.base, spec.wrapper) for spec in args.policy_specs]
    assert specs == [("h2o", "caote"), ("tova", "caote"), ("snapkv", "fastcaote"), ("keydiff", "caote")]
    assert loadgen.DEFAULT_POLICIES == ",".join(format_policy(*spec) for spec in specs)
    with pytest.raises(SystemExit) as exited:
        loadgen.parse_args(["--policies", "h2o+caote"])
    assert exited.value.code == 2
    assert "--policies: 'h2o+caote': the wrapper comes first: 'caote+h2o'" in capsys.readouterr().err


class _AnsweringStub:
    """Answers every Generate with its final message only (the summary)."""

    def __init__(self):
        self.sent = []

    def Generate(self, message, timeout=None):
        from kvevict.v1 import worker_pb2

        self.sent.append(message)
        return iter([worker_pb2.GenerateResponse(summary=worker_pb2.EvictionSummary(prompt_tokens=3))])


def test_the_load_generator_logs_each_request_with_the_one_spelling(caplog):
    loadgen = load_script(LOADGEN)
    args = loadgen.parse_args(["--policies", "fastcaote+snapkv,tova"])
    stub = _AnsweringStub()
    with caplog.at_level("INFO", logger="kvevict.loadgen"):
        assert loadgen.send(stub, args, 0) and loadgen.send(stub, args, 1)
    policies = [(m.eviction.policy.base, m.eviction.policy.wrapper) for m in stub.sent]
    assert policies == [("snapkv", "fastcaote"), ("tova", "none")]
    lines = [r.getMessage() for r in caplog.records if "event=loadgen.request" in r.getMessage()]
    assert [line.split(" policy=")[1].split()[0] for line in lines] == ["fastcaote+snapkv", "tova"]
