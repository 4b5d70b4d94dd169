"""Per-query CAOTE over a window (DropKV's score): the sum over the window's queries of each
query's own exact error of evicting the token alone, (p_ij / (1 - p_ij))^2 ||v_j - o_i||^2."""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.policies.window_errors import WindowErrorPolicy
from kvevict.cache_manager.statistics import QUERY_EVICT_ERROR


@dataclass(frozen=True)
class QueryCAOTE(WindowErrorPolicy):
    name = "querycaote"
    description = "sum over the last `window` queries of each one's exact squared error of evicting the token"
    statistic = QUERY_EVICT_ERROR
