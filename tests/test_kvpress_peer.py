"""benchmarks/peers/kvpress/run.py: NVIDIA kvpress on the suite's prompts, in its own environment.

The metric, the method names and the budget arithmetic are tested here in the project's
environment (run.py imports kvpress only when it runs a prompt). The end-to-end tests need the peer
environment (benchmarks/peers/kvpress/setup.sh, a few minutes and ~1 GB): they run only with
KVEVICT_KVPRESS_TESTS=1, building it first if it is missing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "benchmarks" / "peers" / "kvpress"
SCRIPT = PEER / "run.py"
PEER_PYTHON = PEER / ".venv" / "bin" / "python"
ENABLED = os.environ.get("KVEVICT_KVPRESS_TESTS") == "1"
HOW_TO_ENABLE = ("kvpress end-to-end tests are off: set KVEVICT_KVPRESS_TESTS=1 to run them (they build "
                 "benchmarks/peers/kvpress/.venv with setup.sh if it is missing, a few minutes)")



def _load_run():
    # Registered in sys.modules before it runs: its dataclasses look their module up there.
    spec = importlib.util.spec_from_file_location("kvpress_peer_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = _load_run()


# --- metric and stopping rule ---

@pytest.mark.parametrize(("prediction", "answers", "metric", "expected"), [
    ("52445", ["52445"], "all", 1.0),
    ("  The key is 52445.\n", ["52445"], "all", 1.0),
    ("5244", ["52445"], "all", 0.0),
    ("alpha and gamma", ["alpha", "beta", "gamma", "delta"], "all", 0.5),
    ("alpha and gamma", ["beta", "gamma"], "any", 1.0),
    ("alpha", ["beta", "delta"], "any", 0.0),
    ("Alpha", ["alpha"], "all", 1.0),
    ("ab", ["AB", "c"], "any", 1.0),
    ("a", ["a b"], "all", 0.0),
])
def test_score_is_substring_match_with_partial_credit(prediction, answers, metric, expected) -> None:
    assert run.score(prediction, answers, metric) == expected


def test_score_refuses_an_unknown_metric_and_no_answers() -> None:
    with pytest.raises(ValueError, match="metric"):
        run.score("x", ["x"], "bpb")
    with pytest.raises(ValueError, match="answers"):
        run.score("x", [], "all")


def test_score_agrees_with_the_projects_suite_metric() -> None:
    suite_metric = pytest.importorskip("kvevict.evaluation.suite_metric")
    project_score = suite_metric.score
    cases = [("52445", ["52445"], "all"), (" x 52445 y\n", ["52445"], "all"), ("a c", ["a", "b", "c"], "all"),
             ("b", ["a", "b"], "any"), ("", ["a"], "any"), ("A", ["a"], "all"), ("5244", ["52445"], "all"),
             (" Hello ", ["hello"], "any"), ("X and y", ["x", "Y", "z"], "all")]
    for prediction, answers, metric in cases:
        assert run.score(prediction, answers, metric) == project_score(prediction, answers, metric), (prediction,
                                                                                                     answers, metric)


@pytest.mark.parametrize(("text", "expected"), [
    (" 52445\nThe grass", " 52445"),
    ("\n\n 52445\nmore", "\n\n 52445"),
    ("52445", "52445"),
    ("  \n", "  \n"),
])
def test_prediction_is_cut_at_the_first_newline_after_some_text(text, expected) -> None:
    assert run.cut_at_stop(text) == expected


# --- methods and budgets ---

@pytest.mark.parametrize(("spelling", "label"), [
    ("SnapKV", "SnapKVPress"), ("snapkvpress", "SnapKVPress"), ("H2O", "ObservedAttentionPress"),
    ("CriticalKV(SnapKV)", "CriticalKVPress(SnapKVPress)"), ("adakv( ExpectedAttention )",
                                                             "AdaKVPress(ExpectedAttentionPress)"),
    ("KVzip", "KVzipPress"), ("none", "none"),
])
def test_method_spellings_map_to_kvpress_class_names(spelling, label) -> None:
    assert run.parse_method(spelling).label == label


@pytest.mark.parametrize(("spelling", "message"), [
    ("SnapKB", "unknown press 'SnapKB'"),
    ("Foo(SnapKV)", "unknown wrapper press 'Foo'"),
    ("AdaKV(KVzip)", "unknown scorer press inside AdaKV"),
    ("AdaKV(ObservedAttention)", "needs eager attention"),
    ("SnapKV[3]", "cannot read"),
])
def test_bad_method_names_are_refused_naming_the_option(spelling, message) -> None:
    with pytest.raises(ValueError, match=r"--methods") as error:
        run.parse_method(spelling)
    assert message in str(error.value)


def test_default_methods_split_at_top_level_commas() -> None:
    names = run.split_methods(",".join(run.DEFAULT_METHODS))
    assert names == list(run.DEFAULT_METHODS)
    assert [run.parse_method(name).label for name in names][-3:] == [
        "CriticalKVPress(SnapKVPress)", "AdaKVPress(SnapKVPress)", "KVzipPress"]


def test_compression_ratio_lands_exactly_on_the_budget_under_kvpress_truncation() -> None:
    # kvpress 0.5.5 keeps max(1, int(seen * (1 - ratio))) (utils.compute_n_kept); KVzip prunes
    # int(layers * heads * seen * ratio) tokens across layers. 1 - f alone misses by a token (see the last assert).
    scorer, kvzip = run.parse_method("SnapKV"), run.parse_method("KVzip")
    layers, heads = 30, 3
    for seen in range(65, 4200, 7):
        for fraction in (0.05, 0.1, 0.2, 0.35, 0.5, 0.9):
            kept = round(fraction * seen)
            assert int(seen * (1 - run.compression_ratio(scorer, kept, seen, layers, heads))) == kept
            pruned = int(layers * heads * seen * run.compression_ratio(kvzip, kept, seen, layers, heads))
            assert pruned == layers * heads * (seen - kept)
    assert run.compression_ratio(scorer, 100, 100, layers, heads) == 0.0
    assert int(1000 * (1 - (1 - 0.2))) == 199


def test_kept_fractions_are_checked() -> None:
    assert run.parse_kept("0.1,0.35") == [0.1, 0.35]
    for bad in ("0", "1.0", "0.2,x", ""):
        with pytest.raises(ValueError, match="--kept"):
            run.parse_kept(bad)


def test_plan_runs_the_full_cache_first_and_once() -> None:
    pairs = run.plan([run.parse_method("SnapKV"), run.parse_method("none")], [0.2, 0.5])
    assert [(m.label, f) for m, f in pairs] == [("none", 1.0), ("SnapKVPress", 0.2), ("SnapKVPress", 0.5)]


# --- prompt and results files ---

def _record(index: int, **overrides) -> dict:
    record = {"id": f"code/128/{index:04d}", "task": "code_recall", "family": "code_recall", "length": 128,
              "seed": index, "context": "", "question": "\nassert x ==", "answers": ["5"], "metric": "all",
              "max_new_tokens": 8, "depth": 0.5}
    record.update(overrides)
    return record


def test_prompt_file_skips_unscored_records_and_names_missing_fields(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_record(0)) + "\n" + json.dumps(_record(1, metric="bpb", question="", answers=[]))
                    + "\n")
    assert [r["id"] for r in run.read_prompts(path)] == ["code/128/0000"]
    broken = _record(2)
    del broken["answers"]
    path.write_text(json.dumps(broken) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: record lacks answers"):
        list(run.read_prompts(path))


def test_results_file_with_another_header_is_refused(tmp_path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("system,policy\nkvevict,h2o\n")
    with pytest.raises(ValueError, match="--out"):
        run.done_rows(out)


def test_context_and_question_ids_are_the_tokenization_of_the_whole_prompt(tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_checkpoint(tmp_path / "ckpt"))
    context, question = "def add(a, b):\n    return a + b\n" * 3, "class Point:"
    context_ids, question_ids, straddled = run.split_prompt(tokenizer, context, question)
    assert not straddled and context_ids + question_ids == tokenizer(context + question)["input_ids"]
    # "\n" + "    return" is one token when joined: the boundary would cut it, so they are tokenized apart.
    context_ids, question_ids, straddled = run.split_prompt(tokenizer, context + "\n", "    return a")
    assert straddled and question_ids == tokenizer("    return a", add_special_tokens=False)["input_ids"]


# --- end to end in the peer environment ---

@pytest.fixture(scope="module")
def peer_python() -> Path:
    if not ENABLED:
        pytest.skip(HOW_TO_ENABLE)
    if not PEER_PYTHON.exists() or not (PEER / ".venv" / ".kvpress-installed").exists():
        done = subprocess.run(["bash", str(PEER / "setup.sh")], capture_output=True, text=True, timeout=3600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return PEER_PYTHON


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """A tiny random Llama and three prompts of ~100-200 tokens (SnapKV needs more than its 64-token window)."""
    directory = tmp_path_factory.mktemp("kvpress")
    # head_dim 32: AdaKV masks a key by a fake one that all the question's queries score far below zero,
    # which may not exist for 8-dimensional heads.
    checkpoint = save_tiny_checkpoint(directory / "ckpt", num_hidden_layers=2, hidden_size=128)
    lines = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n"]
    records = []
    for index in range(3):
        context = "".join(lines[(index + k) % 2] for k in range(6 + 3 * index)) + f"x = {index + 3}\n"
        records.append(_record(index, context=context, answers=[str(index + 3)], max_new_tokens=6 + index))
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return checkpoint, prompts, records


def _run_peer(python: Path, checkpoint: Path, prompts: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(python), str(SCRIPT), "--model", str(checkpoint), "--prompts", str(prompts), "--dtype", "float32",
               "--device", "cpu", "--threads", "1", "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _rows(out: Path) -> list[dict]:
    with out.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def agnostic_run(peer_python, suite, tmp_path_factory):
    checkpoint, prompts, records = suite
    directory = tmp_path_factory.mktemp("agnostic")
    out, log = directory / "results.csv", directory / "budget.jsonl"
    _run_peer(peer_python, checkpoint, prompts, out, "--methods", "SnapKV,AdaKV(SnapKV)", "--kept", "0.25,0.5",
              "--budget-log", str(log))
    return out, log


def test_peer_writes_a_row_per_method_fraction_and_prompt(agnostic_run, suite) -> None:
    out, _ = agnostic_run
    _, _, records = suite
    rows = _rows(out)
    assert tuple(rows[0].keys()) == run.CSV_COLUMNS
    got = [(r["method"], float(r["kept_fraction"]), r["id"]) for r in rows]
    expected = [("none", 1.0, r["id"]) for r in records] + [
        (method, fraction, r["id"]) for method in ("SnapKVPress", "AdaKVPress(SnapKVPress)")
        for fraction in (0.25, 0.5) for r in records]
    assert got == expected
    by_id = {r["id"]: r for r in records}
    for row in rows:
        record = by_id[row["id"]]
        assert (row["system"], row["protocol"], row["task"], row["length"]) == (
            "kvpress", "question_agnostic", record["task"], str(record["length"]))
        assert float(row["score"]) == run.score(row["prediction"], record["answers"], record["metric"])
        assert float(row["seconds"]) > 0


def test_peer_keeps_exactly_the_budget_of_context_tokens(agnostic_run) -> None:
    _, log = agnostic_run
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(entries) == 15
    for entry in entries:
        assert entry["seen_tokens"] == entry["context_tokens"] > 64
        expected = entry["context_tokens"] if entry["method"] == "none" else round(
            entry["kept_fraction"] * entry["context_tokens"])
        assert entry["target_kept"] == expected and entry["kept_per_head"] == pytest.approx(expected, abs=1e-9)


def test_full_cache_rows_equal_plain_transformers_greedy_generate(agnostic_run, suite) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = agnostic_run
    checkpoint, _, records = suite
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    full = {r["id"]: r["prediction"] for r in _rows(out) if r["method"] == "none"}
    expected = {}
    for record in records:
        ids = tokenizer(record["context"] + record["question"], return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=record["max_new_tokens"], do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        expected[record["id"]] = run.cut_at_stop(tokenizer.decode(generated, skip_special_tokens=True))
    assert full == expected
    assert any(prediction.strip() for prediction in full.values())


def test_a_rerun_appends_nothing(agnostic_run, suite, peer_python) -> None:
    out, _ = agnostic_run
    checkpoint, prompts, _ = suite
    before = out.read_bytes()
    done = _run_peer(peer_python, checkpoint, prompts, out, "--methods", "SnapKV,AdaKV(SnapKV)", "--kept", "0.25,0.5")
    assert out.read_bytes() == before
    assert "0 rows to run (15 already in" in done.stderr


def test_every_default_press_runs_question_aware_on_its_budget(peer_python, suite, tmp_path) -> None:
    checkpoint, prompts, records = suite
    out, log = tmp_path / "aware.csv", tmp_path / "budget.jsonl"
    _run_peer(peer_python, checkpoint, prompts, out, "--protocol", "question_aware", "--kept", "0.3", "--limit", "1",
              "--budget-log", str(log))
    rows = _rows(out)
    labels = ["none"] + [run.parse_method(name).label for name in run.DEFAULT_METHODS]
    assert [r["method"] for r in rows] == labels
    assert {r["protocol"] for r in rows} == {"question_aware"} and {r["id"] for r in rows} == {records[0]["id"]}
    for entry in map(json.loads, log.read_text().splitlines()):
        # The press sees the context and the question but its last token; the question is not counted.
        assert entry["seen_tokens"] == entry["context_tokens"] + entry["question_tokens"] - 1
        budget = entry["seen_tokens"] if entry["method"] == "none" else (
            round(0.3 * entry["context_tokens"]) + entry["question_tokens"] - 1)
        assert entry["kept_per_head"] == pytest.approx(budget, abs=1e-9), entry["method"]


def _kept_tokens(peer_python, suite, tmp_path, limit: int, methods: str, kept: str) -> dict:
    """kept_tokens.py's masks (`method|id|kept|layer` -> (KV heads, tokens)) on the suite's prompts."""
    import numpy as np

    checkpoint, prompts, _ = suite
    out = tmp_path / "kept.npz"
    done = subprocess.run([str(peer_python), str(PEER / "kept_tokens.py"), "--model", str(checkpoint), "--prompts",
                           str(prompts), "--limit", str(limit), "--methods", methods, "--kept", kept,
                           "--dtype", "float32", "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(np.load(out))


def test_kept_tokens_are_found_and_streaming_keeps_its_sink_and_window(peer_python, suite, tmp_path) -> None:
    import numpy as np

    kept = _kept_tokens(peer_python, suite, tmp_path, limit=2, methods="StreamingLLM,TOVA", kept="0.5")
    assert len(kept) == 2 * 2 * 2  # 2 prompts x 2 presses x 2 layers
    for key, mask in kept.items():
        press, _, _, _ = key.split("|")
        length = mask.shape[1]
        assert (mask.sum(axis=1) == round(0.5 * length)).all(), key  # the budget, found key by key
        if press == "StreamingLLMPress":  # its 4 sink tokens and the most recent ones, in every head
            expected = np.zeros(length, dtype=bool)
            expected[:4] = True
            expected[length - (round(0.5 * length) - 4):] = True
            assert (mask == expected).all(), key


def test_kvzip_kept_tokens_are_what_it_leaves_unmasked_on_its_model_wide_budget(peer_python, suite, tmp_path) -> None:
    import numpy as np

    masks = list(_kept_tokens(peer_python, suite, tmp_path, limit=1, methods="KVzip", kept="0.3").values())
    assert len(masks) == 2  # 1 prompt x 1 press x 2 layers
    heads, length = masks[0].shape
    # One top-k over the whole model: the total is the budget of every (layer, head), the heads differ.
    assert sum(int(m.sum()) for m in masks) == round(0.3 * length) * heads * len(masks)
    counts = np.concatenate([m.sum(axis=1) for m in masks])
    assert counts.min() < counts.max()
