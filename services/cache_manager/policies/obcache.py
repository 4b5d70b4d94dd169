"""OBCache (arXiv 2510.07651): Optimal Brain Damage saliencies of pruning a token's value, its key,
or both, per query of the window (kvevict.worker.query_errors has the closed forms), in place of
SnapKV's attention sum."""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.policies.window_errors import WindowErrorPolicy
from kvevict.cache_manager.statistics import QUERY_KEY_ERROR, QUERY_KEY_VALUE_ERROR, QUERY_VALUE_ERROR


@dataclass(frozen=True)
class OBCacheValue(WindowErrorPolicy):
    name = "obcv"
    description = "OBCache value saliency: sum over the window of p_ij^2 ||v_j||^2"
    statistic = QUERY_VALUE_ERROR


@dataclass(frozen=True)
class OBCacheKey(WindowErrorPolicy):
    name = "obck"
    description = "OBCache key saliency: sum over the window of z_ij^2 p_ij^2 ||v_j - o_i||^2"
    statistic = QUERY_KEY_ERROR


@dataclass(frozen=True)
class OBCacheKeyValue(WindowErrorPolicy):
    name = "obcvk"
    description = "OBCache key-value saliency: sum over the window of p_ij^2 ||v_j - o_i||^2"
    statistic = QUERY_KEY_VALUE_ERROR
