"""Statistics a policy asks the worker for, mirroring `kvevict.v1.Statistic`, and the element
type each travels in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

ATTN_SUM = pb.STATISTIC_ATTN_SUM
ATTN_WINDOW = pb.STATISTIC_ATTN_WINDOW
VALUE_DEV_MEAN = pb.STATISTIC_VALUE_DEV_MEAN
KEY_COSINE = pb.STATISTIC_KEY_COSINE
VALUE_DEV_EXCLUDED = pb.STATISTIC_VALUE_DEV_EXCLUDED
# Per-query output errors over a window of queries (per-query CAOTE, OBCache's value, key and
# key-value saliencies).
QUERY_EVICT_ERROR = pb.STATISTIC_QUERY_EVICT_ERROR
QUERY_VALUE_ERROR = pb.STATISTIC_QUERY_VALUE_ERROR
QUERY_KEY_ERROR = pb.STATISTIC_QUERY_KEY_ERROR
QUERY_KEY_VALUE_ERROR = pb.STATISTIC_QUERY_KEY_VALUE_ERROR
QUERY_PROJECTED_ERROR = pb.STATISTIC_QUERY_PROJECTED_ERROR  # LaProx: after W_O, the group together
QUERY_ERRORS = frozenset({QUERY_EVICT_ERROR, QUERY_VALUE_ERROR, QUERY_KEY_ERROR, QUERY_KEY_VALUE_ERROR,
                          QUERY_PROJECTED_ERROR})

# Probabilities, norms and squared errors: a negative value can only be a worker bug.
NON_NEGATIVE = frozenset({ATTN_SUM, ATTN_WINDOW, VALUE_DEV_MEAN, VALUE_DEV_EXCLUDED}) | QUERY_ERRORS

# Element types a session may ask for; DTYPE_UNSPECIFIED chooses per statistic (wire_dtype).
STATISTICS_DTYPES = (tensor_pb2.DTYPE_UNSPECIFIED, tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT16,
                     tensor_pb2.DTYPE_FLOAT32)


@dataclass(frozen=True, order=True)
class StatisticRequirement:
    """One statistic with its query window (0 where it has none) and, for VALUE_DEV_EXCLUDED,
    the reference weights of its virtual query (with their max-pool kernel)."""

    statistic: int
    window: int = 0
    reference: int = pb.REFERENCE_UNSPECIFIED
    pool_kernel: int = 0

    def __post_init__(self) -> None:
        if self.statistic not in pb.Statistic.values() or self.statistic == pb.STATISTIC_UNSPECIFIED:
            raise ValueError(f"unknown statistic {self.statistic}")
        excluded = self.statistic == VALUE_DEV_EXCLUDED
        if excluded != (self.reference != pb.REFERENCE_UNSPECIFIED):
            raise ValueError(f"statistic {self.statistic} with reference {self.reference}")
        windowed = (self.statistic == ATTN_WINDOW or self.statistic in QUERY_ERRORS
                    or self.reference == pb.REFERENCE_WINDOW_ATTENTION)
        if windowed != (self.window > 0):
            raise ValueError(f"{self.name}: window {self.window} does not fit the statistic")
        if (self.reference == pb.REFERENCE_WINDOW_ATTENTION) != (self.pool_kernel > 0):
            raise ValueError(f"{self.name}: pool kernel {self.pool_kernel} does not fit the statistic")

    @property
    def name(self) -> str:
        base = pb.Statistic.Name(self.statistic).removeprefix("STATISTIC_").lower()
        if self.statistic != VALUE_DEV_EXCLUDED:
            return f"{base}[{self.window}]" if self.window else base
        reference = pb.Reference.Name(self.reference).removeprefix("REFERENCE_").lower()
        if self.reference == pb.REFERENCE_WINDOW_ATTENTION:
            reference += f"[{self.window}]" + (f" pool {self.pool_kernel}" if self.pool_kernel > 1 else "")
        return f"{base}({reference})"

    @property
    def non_negative(self) -> bool:
        return self.statistic in NON_NEGATIVE

    def wire_dtype(self, session_dtype: int) -> int:
        """What this statistic travels as: the session's dtype, or where it is unspecified,
        bfloat16 (float32's range: small probabilities keep their order instead of flushing to
        zero in float16) except for cosines, bounded in [-1, 1], where float16 is 8x finer."""
        if session_dtype != tensor_pb2.DTYPE_UNSPECIFIED:
            return session_dtype
        return tensor_pb2.DTYPE_FLOAT16 if self.statistic == KEY_COSINE else tensor_pb2.DTYPE_BFLOAT16

    def to_proto(self, session_dtype: int = tensor_pb2.DTYPE_UNSPECIFIED) -> pb.StatisticRequirement:
        return pb.StatisticRequirement(statistic=self.statistic, window=self.window, reference=self.reference,
                                       pool_kernel=self.pool_kernel, dtype=self.wire_dtype(session_dtype))

    @classmethod
    def from_proto(cls, message: pb.StatisticRequirement) -> StatisticRequirement:
        return cls(int(message.statistic), int(message.window), int(message.reference), int(message.pool_kernel))

    def to_list(self) -> list[int]:
        return [self.statistic, self.window, self.reference, self.pool_kernel]


def merge_requirements(*groups: Iterable[StatisticRequirement]) -> tuple[StatisticRequirement, ...]:
    """Concatenates requirement lists without duplicates, first occurrence wins (stable order)."""
    return tuple(dict.fromkeys(req for group in groups for req in group))
