"""Eviction policies as plain Python objects: `kvevict.policy("caote+snapkv", window=32)`.

The name is the one spelling of `--policy` and of the summaries (`kvevict.policy_names`); the
options are the CLI's flags (`--sink`, `--recent`, `--window`, `--pool-kernel`, `--seed`) with
underscores. A `Policy` becomes the `PolicySpec` every manager reads (`spec()`), so the Python
API, the CLI and the gRPC services decide the same.

    >>> import kvevict
    >>> p = kvevict.policy("caote+snapkv", window=32)
    >>> str(p), p.base, p.wrapper, p.window
    ('caote+snapkv', 'snapkv', 'caote', 32)
    >>> kvevict.policy("snapkv", pool_kernel=4)
    Traceback (most recent call last):
    ...
    ValueError: pool_kernel: must be odd for a same-size pool, got 4
"""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.policy_names import NO_WRAPPER, format_policy, parse_policy
from kvevict.v1 import cache_manager_pb2 as pb

# PolicySpec fields -> the option names of `policy()` (the CLI's flags).
OPTION_OF_FIELD = {"sink_tokens": "sink", "recent_tokens": "recent", "window": "window", "pool_kernel": "pool_kernel",
                   "seed": "seed", "base": "name", "wrapper": "name"}


@dataclass(frozen=True)
class Policy:
    """A base policy, optionally under a wrapper, with its options (None / 0: the policy's default)."""

    base: str
    wrapper: str = NO_WRAPPER
    sink: int | None = None  # first tokens never evicted
    recent: int | None = None  # most recent tokens never evicted
    window: int = 0  # observation window (snapkv, tova's reference queries)
    pool_kernel: int = 0  # snapkv's max-pool kernel (odd; 1: no pooling)
    seed: int = 0  # the random policy's seed

    def __str__(self) -> str:
        return format_policy(self.base, self.wrapper)

    def spec(self) -> pb.PolicySpec:
        """The protobuf message of this policy (a new one each call)."""
        spec = pb.PolicySpec(base=self.base, wrapper=self.wrapper, window=self.window, pool_kernel=self.pool_kernel,
                             seed=self.seed)
        if self.sink is not None:
            spec.sink_tokens = self.sink
        if self.recent is not None:
            spec.recent_tokens = self.recent
        return spec

    @classmethod
    def from_spec(cls, spec: pb.PolicySpec) -> Policy:
        return cls(base=spec.base, wrapper=spec.wrapper or NO_WRAPPER,
                   sink=spec.sink_tokens if spec.HasField("sink_tokens") else None,
                   recent=spec.recent_tokens if spec.HasField("recent_tokens") else None,
                   window=spec.window, pool_kernel=spec.pool_kernel, seed=spec.seed)


def policy(name: str | Policy | pb.PolicySpec, *, sink: int | None = None, recent: int | None = None,
           window: int = 0, pool_kernel: int = 0, seed: int = 0) -> Policy:
    """A validated Policy from its name (`tova`, `caote+h2o`) and options; a Policy or PolicySpec
    is returned as a Policy unchanged (options then refused). ValueError names the option."""
    if not isinstance(name, str):
        if any(v not in (None, 0) for v in (sink, recent, window, pool_kernel, seed)):
            raise ValueError("options: give them with the policy's name, not beside a Policy object")
        chosen = name if isinstance(name, Policy) else Policy.from_spec(name)
        return _validated(chosen)
    base, wrapper = parse_policy(name, "name")
    return _validated(Policy(base, wrapper, sink, recent, window, pool_kernel, seed))


def _validated(chosen: Policy) -> Policy:
    for option in ("sink", "recent", "window", "pool_kernel", "seed"):
        value = getattr(chosen, option)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{option}: must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{option}: must be >= 0, got {value}")
    # The manager's own checks of the policy alone (those against a budget come with the model).
    from kvevict.cache_manager.errors import InvalidArgument
    from kvevict.cache_manager.policies import make_base
    from kvevict.cache_manager.wrappers import make_policy

    try:
        make_policy(make_base(chosen.base, window=chosen.window, pool_kernel=chosen.pool_kernel, seed=chosen.seed),
                    chosen.wrapper)
    except InvalidArgument as error:
        raise ValueError(f"{option_name(error.field)}: {error.message}") from None
    return chosen


def option_name(field: str) -> str:
    """The option of `policy()` (or the argument of EvictingCache) a manager error's field names:
    `policy.sink_tokens` -> `sink`, `budget.tokens` -> `budget`."""
    head, _, tail = field.partition(".")
    if head == "policy":
        return OPTION_OF_FIELD.get(tail, tail)
    if head == "budget":
        return {"tokens": "budget", "allocator": "allocator"}.get(tail, field)
    return field
