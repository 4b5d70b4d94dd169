"""The configurations the quality benchmark compares: every base x wrapper x allocator, plus the
controls that expose task artifacts."""

from __future__ import annotations

from collections.abc import Sequence

from kvevict.cache_manager.budgets import ALLOCATORS
from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.evaluation.runner import EvictionConfig

BASES = ("h2o", "tova", "snapkv", "keydiff", "streaming", "random")
WRAPPERS = ("none", "caote", "fastcaote")
ALLOCATOR_NAMES = tuple(ALLOCATORS)
BUDGET_FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5)

# Controls: if the most recent tokens alone, or the values alone (no attention, no keys), keep
# what a task needs, the task measures that artifact rather than eviction quality.
RECENT_WINDOW = EvictionConfig(base="streaming", sink=0, recent=0, label="control: recent window")
VALUE_NORM = EvictionConfig(base="valuenorm", label="control: value norm")
CONTROLS = (RECENT_WINDOW, VALUE_NORM)


def allowed(wrapper: str, allocator: str) -> bool:
    """Whether the manager accepts the pair (adaptive ranks output errors: CAOTE wrappers only)."""
    wrappers = ALLOCATORS[allocator].wrappers
    return wrappers is None or wrapper in wrappers


def configurations(bases: Sequence[str] = BASES, wrappers: Sequence[str] = WRAPPERS,
                   allocators: Sequence[str] = ALLOCATOR_NAMES, controls: bool = True) -> list[EvictionConfig]:
    """Every accepted base x wrapper x allocator, then the controls (uniform budgets)."""
    for name in bases:
        if name not in BASE_POLICIES:
            raise ValueError(f"unknown base policy {name!r}; known: {', '.join(BASE_POLICIES)}")
    for name in allocators:
        if name not in ALLOCATORS:
            raise ValueError(f"unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")
    grid = [EvictionConfig(base=base, wrapper=wrapper, allocator=allocator)
            for allocator in allocators for base in bases for wrapper in wrappers if allowed(wrapper, allocator)]
    return grid + (list(CONTROLS) if controls else [])


def budget_tokens(fraction: float, context_tokens: int) -> int:
    """Tokens kept per KV head per layer for a budget given as a fraction of the context."""
    if not 0 < fraction <= 1:
        raise ValueError(f"budget fractions must be in (0, 1], got {fraction}")
    return max(1, round(fraction * context_tokens))
