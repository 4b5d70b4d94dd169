"""LaProx-style: keep the tokens whose eviction would change the layer's output most, through the
output projection and with the query heads that share the KV head together (their changes
interact in W_O), summed over the observation window. The score is in the layer's output units,
comparable across heads and layers."""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.policies.window_errors import WindowErrorPolicy
from kvevict.cache_manager.statistics import QUERY_PROJECTED_ERROR


@dataclass(frozen=True)
class LaProx(WindowErrorPolicy):
    name = "laprox"
    description = "squared change of the layer's output after W_O when the token is evicted, over the window"
    statistic = QUERY_PROJECTED_ERROR
