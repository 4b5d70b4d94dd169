"""KVzip's score: the observer queries' attention to each token, not pooled along tokens and with
no protected window. Under the worker's context reconstruction (EvictionSettings.reconstruct,
pool max) the observers are the queries that repeat the context and the statistic is the largest
probability any of them gives the token, KVzip's own score; without it, the last `window`
queries' summed attention (SnapKV's statistic, unpooled).

Either is attention mass, shares of queries' probabilities, so the scores of different heads and
layers are in the same units: the `global` allocator may rank them model-wide, as KVzip does."""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.snapkv import SnapKV


@dataclass(frozen=True)
class KVzip(SnapKV):
    name = "kvzip"
    description = ("observer attention, unpooled, no window kept: with reconstruction the largest from any "
                   "repeating query (KVzip's score)")

    @classmethod
    def from_options(cls, *, window: int = 0, pool_kernel: int = 0, seed: int = 0) -> KVzip:
        if pool_kernel not in (0, 1):
            raise InvalidArgument("policy.pool_kernel", f"kvzip scores each token alone (1), got {pool_kernel}")
        return super().from_options(window=window, pool_kernel=1)

    def default_recent(self, budget: int) -> int:
        return 0  # KVzip keeps what its queries attend to, the last tokens included or not
