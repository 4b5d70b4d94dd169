"""Base policies, one per file; `BASE_POLICIES` maps the PolicySpec.base names to them."""

from __future__ import annotations

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.base import BasePolicy, LayerContext
from kvevict.cache_manager.policies.h2o import H2O
from kvevict.cache_manager.policies.keydiff import KeyDiff
from kvevict.cache_manager.policies.kvzip import KVzip
from kvevict.cache_manager.policies.laprox import LaProx
from kvevict.cache_manager.policies.obcache import OBCacheKey, OBCacheKeyValue, OBCacheValue
from kvevict.cache_manager.policies.querycaote import QueryCAOTE
from kvevict.cache_manager.policies.random import Random
from kvevict.cache_manager.policies.snapkv import SnapKV, max_pool
from kvevict.cache_manager.policies.streaming import Streaming
from kvevict.cache_manager.policies.tova import TOVA
from kvevict.cache_manager.policies.tova_mean import TOVAMean
from kvevict.cache_manager.policies.valuenorm import ValueNorm

BASE_POLICIES: dict[str, type[BasePolicy]] = {
    cls.name: cls for cls in (H2O, TOVA, TOVAMean, SnapKV, KeyDiff, Streaming, Random, ValueNorm, QueryCAOTE,
                              OBCacheValue, OBCacheKey, OBCacheKeyValue, LaProx, KVzip)
}


def make_base(name: str, *, window: int = 0, pool_kernel: int = 0, seed: int = 0) -> BasePolicy:
    """Builds a base policy by its PolicySpec name; InvalidArgument on `policy.base` if unknown."""
    try:
        cls = BASE_POLICIES[name]
    except KeyError:
        raise InvalidArgument("policy.base", f"unknown base policy {name!r}; known: {', '.join(BASE_POLICIES)}") from None
    return cls.from_options(window=window, pool_kernel=pool_kernel, seed=seed)


__all__ = [
    "BASE_POLICIES", "BasePolicy", "H2O", "KeyDiff", "LayerContext", "Random", "SnapKV", "Streaming",
    "TOVA", "TOVAMean", "ValueNorm", "make_base", "max_pool",
]
