"""`kvevict` command line: generate with an evicting KV cache, list the policies."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

WRAPPERS = ("none", "caote", "fastcaote")
# Each service adds its own commands (`manager serve`, `worker serve`, `client ...`): an
# `add_commands(subparsers)` that registers parsers with `set_defaults(run=callable(args) -> int)`.
SERVICE_COMMANDS = ("kvevict.cache_manager.command", "kvevict.worker.command")


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
    parser.add_argument("--policy", default="tova", help="base policy (see `kvevict policies`)")
    parser.add_argument("--wrapper", default="none", choices=WRAPPERS, help="score wrapper")
    parser.add_argument("--budget", type=int, default=512, help="tokens kept per KV head per layer")
    parser.add_argument("--allocator", default="uniform", help="per-layer budget allocator")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per prefill block / decode report")
    parser.add_argument("--sink", type=int, default=None, help="first tokens never evicted (policy default)")
    parser.add_argument("--recent", type=int, default=None, help="recent tokens never evicted (policy default)")
    parser.add_argument("--window", type=int, default=0, help="observation window (snapkv; 0 = default)")
    parser.add_argument("--pool-kernel", type=int, default=0, help="pooling kernel (snapkv; 0 = default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and of the random policy")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--statistics-dtype", default="float16", choices=("float16", "float32"),
                        help="element type of the statistics sent to the manager")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on <= 2 cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while prefilling")
    parser.add_argument("--trust-remote-code", action="store_true")


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers.utils import logging as transformers_logging

    from kvevict.worker.cache_session import EvictionSettings
    from kvevict.worker.generator import EvictingGenerator
    from kvevict.worker.manager_client import EmbeddedManagerClient
    from kvevict.worker.model_loader import default_threads, load_model
    from kvevict.worker.sampling import SamplingConfig
    from kvevict.worker.summary import format_summary
    from kvevict.cache_manager.errors import ManagerError

    torch.set_num_threads(args.threads or default_threads())
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury the output
    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    prompt_ids = tokenizer(text, return_tensors="pt").input_ids[0]
    settings = EvictionSettings(
        policy=_policy_spec(args), budget=pb.BudgetSpec(tokens=args.budget, allocator=args.allocator),
        block_size=args.block_size,
        statistics_dtype=tensor_pb2.DTYPE_FLOAT32 if args.statistics_dtype == "float32" else tensor_pb2.DTYPE_FLOAT16,
    )
    generator = EvictingGenerator(model, EmbeddedManagerClient(), settings)
    progress = _prefill_progress(len(prompt_ids), args.block_size, disabled=args.no_progress)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        result = generator.generate(prompt_ids, args.max_new_tokens, sampling,
                                    eos_token_ids=_eos_ids(tokenizer, model),
                                    on_prefill_block=progress.update if progress else None)
    except ManagerError as error:
        print(f"kvevict: error: {error}", file=sys.stderr)
        return 2
    finally:
        if progress:
            progress.close()
    print(tokenizer.decode(result.token_ids, skip_special_tokens=True))
    print()
    print(format_summary(result.summary, policy=_policy_label(args)))
    return 0


def _policy_spec(args: argparse.Namespace) -> pb.PolicySpec:
    spec = pb.PolicySpec(base=args.policy, wrapper=args.wrapper, window=args.window,
                         pool_kernel=args.pool_kernel, seed=args.seed)
    for flag, field in ((args.sink, "sink_tokens"), (args.recent, "recent_tokens")):
        if flag is not None:
            if flag < 0:
                raise ValueError(f"--{field.split('_')[0]} must be >= 0, got {flag}")
            setattr(spec, field, flag)
    for name in ("budget", "block_size", "max_new_tokens", "window", "pool_kernel"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return spec


def _policy_label(args: argparse.Namespace) -> str:
    wrapper = "" if args.wrapper == "none" else f"{args.wrapper}+"
    return f"{wrapper}{args.policy}, budget {args.budget} ({args.allocator}), block {args.block_size}"


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for candidate in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    return ids


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
