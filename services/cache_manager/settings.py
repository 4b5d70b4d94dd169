"""A session's settings: the OpenSessionRequest validated and resolved (defaults filled in).

Settings are plain data so any replica can rebuild the session's policy and allocator from the
stored state; `policy()` and `allocator()` do that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvevict.cache_manager.budgets import BudgetAllocator, make_allocator
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.geometry import Geometry
from kvevict.cache_manager.policies import make_base
from kvevict.cache_manager.selection import validate_protection
from kvevict.cache_manager.statistics import STATISTICS_DTYPES, StatisticRequirement
from kvevict.cache_manager.wrappers import Wrapper, make_policy
from kvevict.v1 import cache_manager_pb2 as pb


@dataclass(frozen=True)
class SessionSettings:
    """Everything OpenSession fixed for the life of a session."""

    geometry: Geometry
    base: str
    wrapper: str
    window: int  # as requested; 0 = the policy's default
    pool_kernel: int  # as requested; 0 = the policy's default
    seed: int
    sink: int  # resolved: the request's value or the policy's default
    recent: int  # resolved likewise
    budget_tokens: int
    allocator_name: str
    block_size: int
    statistics_dtype: int  # as requested; DTYPE_UNSPECIFIED = per statistic (StatisticRequirement.wire_dtype)
    statistics: tuple[StatisticRequirement, ...]

    def policy(self) -> Wrapper:
        base = make_base(self.base, window=self.window, pool_kernel=self.pool_kernel, seed=self.seed)
        return make_policy(base, self.wrapper)

    def allocator(self) -> BudgetAllocator:
        return make_allocator(self.allocator_name, self.budget_tokens, self.sink, self.recent, self.wrapper)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["statistics"] = [req.to_list() for req in self.statistics]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSettings:
        data = dict(data)
        data["geometry"] = Geometry(**data["geometry"])
        data["statistics"] = tuple(StatisticRequirement(*fields) for fields in data["statistics"])
        return cls(**data)


def settings_from_request(request: pb.OpenSessionRequest) -> SessionSettings:
    """Validates an OpenSessionRequest and resolves its defaults; InvalidArgument names the field."""
    geometry = Geometry.from_proto(request.geometry)
    if request.block_size <= 0:
        raise InvalidArgument("block_size", f"must be > 0, got {request.block_size}")
    dtype = request.statistics_dtype
    if dtype not in STATISTICS_DTYPES:
        raise InvalidArgument("statistics_dtype", f"must be unspecified, DTYPE_BFLOAT16, DTYPE_FLOAT16 or DTYPE_FLOAT32, got {dtype}")
    # Name and tokens first; the allocator is rebuilt below with the resolved protection and wrapper.
    allocator = make_allocator(request.budget.allocator, request.budget.tokens)
    spec = request.policy
    base = make_base(spec.base, window=spec.window, pool_kernel=spec.pool_kernel, seed=spec.seed)
    policy = make_policy(base, spec.wrapper)
    sink = spec.sink_tokens if spec.HasField("sink_tokens") else base.default_sink
    # Defaults that depend on the budget use the average budget (uniform: every layer's).
    recent = spec.recent_tokens if spec.HasField("recent_tokens") else base.default_recent(allocator.tokens)
    allocator = make_allocator(allocator.name, allocator.tokens, sink, recent, policy.name)
    # Every layer's budget (pyramid: the smallest, top layer) must leave room for sink + recent.
    validate_protection(sink, recent, allocator.initial_budgets(geometry))
    return SessionSettings(
        geometry=geometry,
        base=base.name,
        wrapper=policy.name,
        window=spec.window,
        pool_kernel=spec.pool_kernel,
        seed=spec.seed,
        sink=sink,
        recent=recent,
        budget_tokens=allocator.tokens,
        allocator_name=allocator.name,
        block_size=request.block_size,
        statistics_dtype=dtype,
        statistics=policy.required_statistics(),
    )
