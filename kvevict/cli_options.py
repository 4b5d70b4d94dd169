"""Flags shared by `kvevict generate`, `kvevict worker serve` and `kvevict client ...`, and the
protobuf specs built from them (one definition of every eviction and sampling flag)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeVar

from kvevict import defaults
from kvevict.policy_names import NO_WRAPPER, format_policy, parse_policy
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

WRAPPERS = ("none", "caote", "fastcaote")
DTYPES = ("float32", "bfloat16", "float16")
# "auto": the manager's choice per statistic (bfloat16 for probabilities and norms, float16 for
# cosines; see docs/CAOTE.md).
STATISTICS_DTYPES = {"auto": tensor_pb2.DTYPE_UNSPECIFIED, "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
                     "float16": tensor_pb2.DTYPE_FLOAT16, "float32": tensor_pb2.DTYPE_FLOAT32}
T = TypeVar("T")


def add_eviction_flags(parser: argparse.ArgumentParser) -> None:
    """Policy, wrapper, budget, allocator, block size and the policy's options (defaults: kvevict.defaults)."""
    parser.add_argument("--policy", default=defaults.BASE,
                        help="base policy, or wrapper+base such as caote+h2o; see `kvevict policies` "
                             "(default: %(default)s)")
    parser.add_argument("--wrapper", default=None, choices=WRAPPERS,
                        help=f"score wrapper, when --policy names none (default: {defaults.WRAPPER})")
    parser.add_argument("--budget", type=int, default=defaults.BUDGET_TOKENS,
                        help="tokens kept per KV head per layer, on average (default: %(default)s)")
    parser.add_argument("--allocator", default=defaults.ALLOCATOR,
                        help="budget allocator: per layer uniform, pyramid, adaptive or epicache; per KV head "
                             "adahead, global or lukv (each head keeps its own count, freed for real); "
                             "see `kvevict policies` (default: %(default)s)")
    parser.add_argument("--head-floor", type=float, default=None,
                        help="floor as a fraction of --budget: per-head allocators keep at least floor x budget "
                             "tokens in every KV head (default 0.2), epicache per layer (default 0.25)")
    parser.add_argument("--head-profile", default=None, metavar="FILE",
                        help="lukv and epicache: the file `kvevict profile` wrote for this model")
    parser.add_argument("--block-size", type=int, default=defaults.BLOCK_SIZE,
                        help="tokens per prefill block / decode report (default: %(default)s)")
    parser.add_argument("--sink", type=int, default=None, help="first tokens never evicted (default: the policy's)")
    parser.add_argument("--recent", type=int, default=None, help="recent tokens never evicted (default: the policy's)")
    parser.add_argument("--window", type=int, default=0, help="observation window (snapkv; 0 = the policy's default)")
    parser.add_argument("--pool-kernel", type=int, default=0, help="pooling kernel (snapkv; 0 = the policy's default)")


def add_sampling_flags(parser: argparse.ArgumentParser, max_new_tokens: int = 64,
                       max_new_tokens_help: str | None = None) -> None:
    """Tokens to generate, temperature, top-p and the seed (of sampling and of the random policy)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=max_new_tokens_help or "most tokens to generate (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of sampling and of the random policy (default: %(default)s)")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """Where and how the model runs: device, dtype, statistics dtype, CPU threads."""
    parser.add_argument("--device", default="cpu",
                        help="any torch device: cpu, cuda, cuda:1, mps, ... (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default: %(default)s)")
    parser.add_argument("--statistics-dtype", default="auto", choices=tuple(STATISTICS_DTYPES),
                        help="element type of the statistics sent to the manager (auto: 2 bytes each, "
                             "bfloat16 or float16 per statistic; float16 flushes probabilities below 6e-8; "
                             "default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on <= 2 cores)")
    parser.add_argument("--pipelined", action="store_true", default=None,
                        help="decide each report while the next block runs (its keep masks apply one block "
                             "late: the cache peaks at the budget plus two blocks) [KVEVICT_PIPELINED for worker "
                             "serve, default off]")
    parser.add_argument("--lookahead", type=int, default=None,
                        help="before each prefill decision, decode this many pseudo tokens greedily and observe "
                             "with their queries (window policies; Lookahead Q-Cache) [KVEVICT_LOOKAHEAD for worker "
                             "serve, default 0]")


def policy_names(args: argparse.Namespace) -> tuple[str, str]:
    """(base, wrapper) of --policy and --wrapper; ValueError when --policy is misspelt or both
    name a wrapper."""
    base, wrapper = parse_policy(args.policy, "--policy")
    if args.wrapper is not None:
        if wrapper != NO_WRAPPER:
            raise ValueError(f"--wrapper {args.wrapper}: --policy {args.policy} names its wrapper already; "
                             f"give the wrapper once")
        wrapper = args.wrapper
    return base, wrapper


def policy_spec(args: argparse.Namespace) -> pb.PolicySpec:
    """The PolicySpec of the eviction flags; ValueError names a misspelt or negative flag."""
    base, wrapper = policy_names(args)
    spec = pb.PolicySpec(base=base, wrapper=wrapper, window=args.window,
                         pool_kernel=args.pool_kernel, seed=getattr(args, "seed", 0))
    for flag, field in ((args.sink, "sink_tokens"), (args.recent, "recent_tokens")):
        if flag is not None:
            if flag < 0:
                raise ValueError(f"--{field.split('_')[0]} must be >= 0, got {flag}")
            setattr(spec, field, flag)
    for name in ("budget", "block_size", "max_new_tokens", "window", "pool_kernel"):
        value = getattr(args, name, 0)
        if value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    return spec


def budget_spec(args: argparse.Namespace) -> pb.BudgetSpec:
    """--budget, --allocator, --head-floor and --head-profile (the file's bytes travel to the manager)."""
    spec = pb.BudgetSpec(tokens=args.budget, allocator=args.allocator)
    floor = getattr(args, "head_floor", None)
    if floor is not None:
        spec.floor = floor
    profile = getattr(args, "head_profile", None)
    if profile:
        try:
            spec.profile = Path(profile).read_bytes()
        except OSError as error:
            raise ValueError(f"--head-profile: cannot read {profile}: {error.strerror}") from None
    return spec


def statistics_dtype(args: argparse.Namespace) -> int:
    return STATISTICS_DTYPES[args.statistics_dtype]


def policy_label(args: argparse.Namespace) -> str:
    """e.g. `caote+tova, budget 512 (uniform), block 128` (the summary's title)."""
    return f"{format_policy(*policy_names(args))}, budget {args.budget} ({args.allocator}), block {args.block_size}"


def env_default(name: str, default: T) -> str | T:
    """The environment variable `name`, else `default`: a flag default that argparse converts
    with the flag's `type` (argparse parses string defaults), so a bad value is a usage error."""
    return os.environ.get(name) or default


def env_flag(raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off."""
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")
