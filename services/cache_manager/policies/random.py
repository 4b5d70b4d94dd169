"""Random eviction: the baseline every policy must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvevict.cache_manager.policies.base import BasePolicy, LayerContext, excluded_deviation
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb


@dataclass(frozen=True)
class Random(BasePolicy):
    name = "random"
    description = "seeded uniform score, reproducible per (seed, sequence, layer)"
    seed: int = field(default=0, metadata={"doc": "seed of the draws (PolicySpec.seed)"})

    @classmethod
    def from_options(cls, *, window: int = 0, pool_kernel: int = 0, seed: int = 0) -> Random:
        return cls(seed=seed)

    def score(self, ctx: LayerContext) -> np.ndarray:
        # Seeding from (seed, sequence, layer) makes a retried or replayed report decide the same.
        rng = np.random.default_rng([self.seed, ctx.sequence, ctx.layer])
        return rng.random(ctx.positions.shape)

    def caote_reference(self) -> StatisticRequirement:
        # The draws exist only here; their expectation weighs every token alike (an approximation
        # of the virtual query's output, measured in tests/test_caote_references.py).
        return excluded_deviation(pb.REFERENCE_UNIFORM)
