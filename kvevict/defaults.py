"""The eviction defaults, decided here once.

`kvevict generate` / `kvevict score` / `kvevict worker serve` / `kvevict client ...` take their flag
defaults from here; the worker service fills a request's unset EvictionOptions fields from its own
settings, which are these unless `worker serve` was told otherwise; EvictionSettings (the Python
API) defaults to them. No torch here: the manager image imports it.

    >>> from kvevict import defaults
    >>> defaults.policy_spec().base, defaults.budget_spec().tokens, defaults.BLOCK_SIZE
    ('tova', 512, 128)
"""

from __future__ import annotations

from kvevict.v1 import cache_manager_pb2 as pb

BASE = "tova"  # PolicySpec.base
WRAPPER = "none"  # PolicySpec.wrapper
BUDGET_TOKENS = 512  # BudgetSpec.tokens: average tokens kept per KV head per layer
ALLOCATOR = "uniform"  # BudgetSpec.allocator
BLOCK_SIZE = 128  # tokens per prefill block and decode steps per report

# The full cache (nothing evicted): a budget no sequence reaches, under StreamingLLM, which needs
# no statistics and accumulates nothing, so the worker computes none and never reports.
FULL_CACHE_BASE = "streaming"
FULL_CACHE_BUDGET = 2**31 - 1


def policy_spec() -> pb.PolicySpec:
    """The default policy (a new message each call: callers may change it)."""
    return pb.PolicySpec(base=BASE, wrapper=WRAPPER)


def budget_spec() -> pb.BudgetSpec:
    """The default budget (a new message each call)."""
    return pb.BudgetSpec(tokens=BUDGET_TOKENS, allocator=ALLOCATOR)


def full_cache_policy() -> pb.PolicySpec:
    """The policy of a run that evicts nothing (with `full_cache_budget()`); nothing protected, so
    any budget of at least one token is valid."""
    return pb.PolicySpec(base=FULL_CACHE_BASE, wrapper="none", sink_tokens=0, recent_tokens=0)


def full_cache_budget(tokens: int = FULL_CACHE_BUDGET) -> pb.BudgetSpec:
    """A budget of `tokens`: at least every token of the sequence, so none is evicted."""
    return pb.BudgetSpec(tokens=tokens, allocator="uniform")
