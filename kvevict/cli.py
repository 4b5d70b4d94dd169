"""`kvevict` command line: generate or score with an evicting KV cache, list the policies."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from kvevict.cli_options import add_eviction_flags, add_runtime_flags, add_sampling_flags

# Each service adds its own commands (`manager serve`, `worker serve`, `client ...`): an
# `add_commands(subparsers)` that registers parsers with `set_defaults(run=callable(args) -> int)`.
SERVICE_COMMANDS = ("kvevict.cache_manager.command", "kvevict.worker.command", "kvevict.worker.models_command",
                    "kvevict.evaluation.eval_command", "kvevict.profile_command")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvevict", description="KV-cache token eviction for LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser(
        "generate", help="generate text with an evicting KV cache (in this process)",
        description="Generates with a model loaded in this process and an embedded cache manager, through the "
                    "worker service's code path; prints the text as it comes, then the eviction summary."))
    _add_score(commands.add_parser(
        "score", help="log-probabilities and perplexity of a text under eviction (in this process)",
        description="Teacher-forced log-probabilities of a text fed block by block with eviction, as the worker "
                    "service's Score computes them, in this process; prints the total, the perplexity and the "
                    "eviction summary."))
    commands.add_parser("policies", help="list eviction policies, wrappers, allocators and their options")
    for module in SERVICE_COMMANDS:
        importlib.import_module(module).add_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            from kvevict.worker.offline import run_generate

            return run_generate(args)
        if args.command == "score":
            from kvevict.worker.offline import run_score

            return run_score(args)
        if args.command == "policies":
            return _policies()
        return args.run(args)
    except (ValueError, OSError) as error:  # bad flags, unreadable files, invalid policy settings
        print(f"kvevict: error: {error}", file=sys.stderr)
        return 2


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint directory or Hugging Face hub id")
    parser.add_argument("--trust-remote-code", action="store_true")


def _add_local_eviction_flags(parser: argparse.ArgumentParser) -> None:
    add_eviction_flags(parser)
    parser.add_argument("--full-cache", action="store_true",
                        help="evict nothing (a budget of every token; no statistics, no reports): the reference "
                             "to compare a policy with")


def _add_generate(parser: argparse.ArgumentParser) -> None:
    _add_model_flags(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    prompt.add_argument("--chat", type=Path,
                        help='JSON file of chat messages, [{"role": "user", "content": "..."}], rendered with the '
                             "tokenizer's chat template (with the generation prompt)")
    parser.add_argument("--stop", action="append",
                        help="stop string (repeatable): generation ends once the text holds one; it is not printed")
    _add_local_eviction_flags(parser)
    add_sampling_flags(parser, max_new_tokens=64)
    add_runtime_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (completion, token ids, finish reason, eviction summary) "
                             "instead of the text and the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while prefilling")


def _add_score(parser: argparse.ArgumentParser) -> None:
    _add_model_flags(parser)
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text to score")
    text.add_argument("--file", type=Path, help="file holding the text to score")
    _add_local_eviction_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy (default: %(default)s)")
    add_runtime_flags(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (every token's log-probability, total, perplexity, eviction "
                             "summary) instead of the text")


def _policies() -> int:
    from kvevict.cache_manager.registry import format_policies

    print(format_policies())
    return 0


if __name__ == "__main__":
    sys.exit(main())
