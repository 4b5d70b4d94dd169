"""Statistics a policy asks the worker for, mirroring `kvevict.v1.Statistic`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvevict.v1 import cache_manager_pb2 as pb

ATTN_SUM = pb.STATISTIC_ATTN_SUM
ATTN_WINDOW = pb.STATISTIC_ATTN_WINDOW
VALUE_DEV_WINDOW = pb.STATISTIC_VALUE_DEV_WINDOW
VALUE_DEV_RUNNING = pb.STATISTIC_VALUE_DEV_RUNNING
VALUE_DEV_MEAN = pb.STATISTIC_VALUE_DEV_MEAN
KEY_COSINE = pb.STATISTIC_KEY_COSINE

# Only these are defined over a query window; the others must carry window 0.
WINDOWED = frozenset({ATTN_WINDOW, VALUE_DEV_WINDOW})
# Probabilities and norms: a negative value can only be a worker bug.
NON_NEGATIVE = frozenset({ATTN_SUM, ATTN_WINDOW, VALUE_DEV_WINDOW, VALUE_DEV_RUNNING, VALUE_DEV_MEAN})


@dataclass(frozen=True, order=True)
class StatisticRequirement:
    """One statistic with its query window (window 0 for statistics that have none)."""

    statistic: int
    window: int = 0

    def __post_init__(self) -> None:
        if self.statistic not in pb.Statistic.values() or self.statistic == pb.STATISTIC_UNSPECIFIED:
            raise ValueError(f"unknown statistic {self.statistic}")
        if (self.statistic in WINDOWED) != (self.window > 0):
            raise ValueError(f"{self.name}: window {self.window} does not fit the statistic")

    @property
    def name(self) -> str:
        base = pb.Statistic.Name(self.statistic).removeprefix("STATISTIC_").lower()
        return f"{base}[{self.window}]" if self.window else base

    @property
    def non_negative(self) -> bool:
        return self.statistic in NON_NEGATIVE

    def to_proto(self) -> pb.StatisticRequirement:
        return pb.StatisticRequirement(statistic=self.statistic, window=self.window)

    @classmethod
    def from_proto(cls, message: pb.StatisticRequirement) -> StatisticRequirement:
        return cls(int(message.statistic), int(message.window))


def merge_requirements(*groups: Iterable[StatisticRequirement]) -> tuple[StatisticRequirement, ...]:
    """Concatenates requirement lists without duplicates, first occurrence wins (stable order)."""
    return tuple(dict.fromkeys(req for group in groups for req in group))
