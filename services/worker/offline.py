"""`kvevict generate` and `kvevict score`: the worker service's request path run in this process
on a model loaded here, without a server.

The flags become the service's request messages and go through the same code: `prompts` (text,
chat template, stop strings, sampling and eviction validation), `completion` (detokenizing, stop
strings, finish reason), `scoring` and `output` (what `kvevict client ...` prints too). Request
errors name the flag that set the field (`--sink (eviction.policy.sink_tokens): ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm
from transformers.utils import logging as transformers_logging

from kvevict import defaults
from kvevict.cli_options import budget_spec, policy_label, policy_spec, statistics_dtype
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.client import read_chat
from kvevict.worker.completion import complete
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.manager_client import EmbeddedManagerClient
from kvevict.worker.model_loader import default_threads, geometry_of, load_model, resolve_device
from kvevict.worker.output import generation_json, generation_text, score_json, score_text
from kvevict.worker.prompts import (ErrorKind, EvictionDefaults, Limits, RequestError, eos_token_ids,
                                    eviction_settings, prompt_ids, sampling_config, score_ids, stop_strings,
                                    vocabulary_size)
from kvevict.worker.scoring import score_tokens

# Request fields -> the flags that set them (the longest matching prefix of a field wins).
_FLAGS = {
    "prompt": "--prompt", "text": "--prompt", "chat": "--chat", "stop": "--stop", "input": "--text",
    "sampling.temperature": "--temperature", "sampling.top_p": "--top-p",
    "eviction.policy.base": "--policy", "eviction.policy.wrapper": "--wrapper",
    "eviction.policy.sink_tokens": "--sink", "eviction.policy.recent_tokens": "--recent",
    "eviction.policy.window": "--window", "eviction.policy.pool_kernel": "--pool-kernel",
    "eviction.budget.tokens": "--budget", "eviction.budget.allocator": "--allocator",
    "eviction.budget.floor": "--head-floor", "eviction.budget.profile": "--head-profile",
    "eviction.block_size": "--block-size",
}
# The eviction flags --full-cache leaves no room for, with their defaults.
_EVICTION_FLAGS = {"policy": defaults.BASE, "wrapper": None, "budget": defaults.BUDGET_TOKENS,
                   "allocator": defaults.ALLOCATOR, "sink": None, "recent": None, "window": 0, "pool_kernel": 0,
                   "head_floor": None, "head_profile": None}


def run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    request = worker_pb2.GenerateRequest(
        sampling=worker_pb2.SamplingOptions(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        stop=args.stop or [])
    if args.chat is not None:
        try:
            request.chat.CopyFrom(read_chat(args.chat))
        except json.JSONDecodeError as error:
            raise ValueError(f"--chat: {args.chat} is not JSON ({error})") from None
        except ValueError as error:  # not a list of messages
            raise ValueError(f"--chat: {error}") from None
    else:
        request.text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    model, tokenizer, geometry, manager = _load(args)
    with _flag_errors(args, {"text": "--prompt" if args.prompt is not None else "--prompt-file"}):
        ids = prompt_ids(request, tokenizer, vocabulary_size(model), Limits(max_prompt_tokens=sys.maxsize))
        sampling, stop = sampling_config(request.sampling), stop_strings(request.stop)
        settings = _settings(args, request, geometry, full_cache_tokens=ids.numel() + args.max_new_tokens)
    progress = _prefill_progress(ids.numel(), settings.block_size, disabled=args.no_progress)

    def on_delta(_token_id: int, text: str) -> None:
        if text and not args.json:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        completion = complete(EvictingGenerator(model, manager, settings), tokenizer, ids, args.max_new_tokens,
                              sampling, eos_token_ids(tokenizer, model), stop, on_delta=on_delta,
                              on_prefill_block=progress.update if progress else None)
    finally:
        if progress:
            progress.close()
    label = _label(args)
    if args.json:
        print(generation_json(completion.text, completion.token_ids, completion.finish_reason, completion.summary,
                              label))
    else:
        sys.stdout.write(completion.tail)
        print("\n")
        print(generation_text(completion.finish_reason, completion.summary, label))
    return 0


def run_score(args: argparse.Namespace) -> int:
    request = worker_pb2.ScoreRequest(text=args.text if args.text is not None else args.file.read_text())
    model, tokenizer, geometry, manager = _load(args)
    with _flag_errors(args, {"text": "--text" if args.text is not None else "--file"}):
        ids = score_ids(request, tokenizer, vocabulary_size(model), Limits(max_prompt_tokens=sys.maxsize))
        settings = _settings(args, request, geometry, full_cache_tokens=ids.numel())
    result = score_tokens(model, manager, settings, ids)
    show = score_json if args.json else score_text
    print(show(result.token_logprobs.float().numpy(), result.total_logprob, result.perplexity, result.summary,
               _label(args)))
    return 0


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, object, pb.ModelGeometry, EmbeddedManagerClient]:
    """The model and tokenizer (after checking --device: a typo should not wait for the weights),
    the model's geometry and an embedded manager."""
    resolve_device(args.device)
    torch.set_num_threads(args.threads or default_threads())
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury the output
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    return model, tokenizer, geometry_of(model), EmbeddedManagerClient()


def _settings(args: argparse.Namespace, request, geometry: pb.ModelGeometry,
              full_cache_tokens: int) -> EvictionSettings:
    """The eviction flags as the worker's defaults for `request` (which sets no `eviction`),
    validated as the worker service validates them. --full-cache: a budget of every token."""
    if args.full_cache:
        given = [name for name, default in _EVICTION_FLAGS.items() if getattr(args, name) != default]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"--full-cache evicts nothing: drop {flags}")
        eviction = EvictionDefaults(policy=defaults.full_cache_policy(),
                                    budget=defaults.full_cache_budget(max(1, full_cache_tokens)),
                                    block_size=_block_size(args), statistics_dtype=statistics_dtype(args))
    else:
        eviction = EvictionDefaults(policy=policy_spec(args), budget=budget_spec(args), block_size=_block_size(args),
                                    statistics_dtype=statistics_dtype(args), pipelined=bool(args.pipelined),
                                    lookahead=_lookahead(args))
    return eviction_settings(request, eviction, geometry, sampling_seed=getattr(args, "seed", 0))


def _lookahead(args: argparse.Namespace) -> int:
    if (args.lookahead or 0) < 0:
        raise ValueError(f"--lookahead must be >= 0, got {args.lookahead}")
    return args.lookahead or 0


def _block_size(args: argparse.Namespace) -> int:
    if args.block_size < 1:
        raise ValueError(f"--block-size must be >= 1, got {args.block_size}")
    return args.block_size


def _label(args: argparse.Namespace) -> str:
    return f"full cache, block {args.block_size}" if args.full_cache else policy_label(args)


@contextmanager
def _flag_errors(args: argparse.Namespace, flags: dict[str, str]) -> Iterator[None]:
    """A RequestError inside becomes a ValueError naming the flag that set the field (`flags`
    adds to or overrides _FLAGS)."""
    try:
        yield
    except RequestError as error:
        if error.field == "chat" and error.kind == ErrorKind.PRECONDITION:
            raise ValueError(f"--chat: the tokenizer of {args.model} has no chat template; "
                             f"give the prompt as --prompt or --prompt-file") from None
        known = {**_FLAGS, **flags}
        names = [name for name in known if error.field == name or error.field.startswith((name + ".", name + "["))]
        flag = known[max(names, key=len)] if names else None
        raise ValueError(f"{flag} ({error.field}): {error.message}" if flag else str(error)) from None


def _prefill_progress(prompt_tokens: int, block_size: int, disabled: bool) -> tqdm | None:
    if disabled or prompt_tokens <= block_size:
        return None
    return tqdm(total=prompt_tokens, unit="tok", desc="prefill", file=sys.stderr, leave=False)

