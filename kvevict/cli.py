"""`kvevict` command line: generate with an evicting KV cache, list the policies."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from kvevict.cli_options import (add_eviction_flags, add_runtime_flags, add_sampling_flags, budget_spec,
                                 policy_label, policy_spec, statistics_dtype)

# Each service adds its own commands (`manager serve`, `worker serve`, `client ...`): an
# `add_commands(subparsers)` that registers parsers with `set_defaults(run=callable(args) -> int)`.
SERVICE_COMMANDS = ("kvevict.cache_manager.command", "kvevict.worker.command", "kvevict.worker.models_command")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvevict", description="KV-cache token eviction for LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands.add_parser("generate", help="generate text with an evicting KV cache"))
    commands.add_parser("policies", help="list eviction policies, wrappers, allocators and their options")
    for module in SERVICE_COMMANDS:
        importlib.import_module(module).add_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "policies":
            return _policies()
        return args.run(args)
    except (ValueError, OSError) as error:  # bad flags, unreadable files, invalid policy settings
        print(f"kvevict: error: {error}", file=sys.stderr)
        return 2


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local checkpoint directory or Hugging Face hub id")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    add_eviction_flags(parser)
    add_sampling_flags(parser, max_new_tokens=64)
    add_runtime_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while prefilling")
    parser.add_argument("--trust-remote-code", action="store_true")


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from kvevict.worker.cache_session import EvictionSettings
    from kvevict.worker.generator import EvictingGenerator
    from kvevict.worker.manager_client import EmbeddedManagerClient
    from kvevict.worker.model_loader import default_threads, load_model
    from kvevict.worker.prompts import eos_token_ids
    from kvevict.worker.sampling import SamplingConfig
    from kvevict.worker.summary import format_summary
    from kvevict.cache_manager.errors import ManagerError

    torch.set_num_threads(args.threads or default_threads())
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury the output
    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids[0]
    settings = EvictionSettings(policy=policy_spec(args), budget=budget_spec(args), block_size=args.block_size,
                                statistics_dtype=statistics_dtype(args))
    generator = EvictingGenerator(model, EmbeddedManagerClient(), settings)
    progress = _prefill_progress(len(prompt_ids), args.block_size, disabled=args.no_progress)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        result = generator.generate(prompt_ids, args.max_new_tokens, sampling,
                                    eos_token_ids=eos_token_ids(tokenizer, model),
                                    on_prefill_block=progress.update if progress else None)
    except ManagerError as error:
        print(f"kvevict: error: {error}", file=sys.stderr)
        return 2
    finally:
        if progress:
            progress.close()
    print(tokenizer.decode(result.token_ids, skip_special_tokens=True))
    print()
    print(format_summary(result.summary, policy=policy_label(args)))
    return 0


def _prefill_progress(prompt_tokens: int, block_size: int, disabled: bool):
    if disabled or prompt_tokens <= block_size:
        return None
    from tqdm import tqdm

    return tqdm(total=prompt_tokens, unit="tok", desc="prefill", file=sys.stderr, leave=False)


def _policies() -> int:
    from kvevict.cache_manager.registry import format_policies

    print(format_policies())
    return 0


if __name__ == "__main__":
    sys.exit(main())
