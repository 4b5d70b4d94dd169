"""A session's settings: the OpenSessionRequest validated and resolved (defaults filled in).

Settings are plain data so any replica can rebuild the session's policy and allocator from the
stored state; `policy()` and `allocator()` do that.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from typing import Any

import numpy as np

from kvevict.cache_manager import head_budgets
from kvevict.cache_manager.budgets import PER_HEAD_ALLOCATORS, BudgetAllocator, check_allocator_name, make_allocator
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
    # The fields below keep their defaults in sessions of the plain per-layer allocators (and
    # to_dict leaves them out there, so those sessions' stored settings are as before).
    # True for the per-head allocators (adahead, global, lukv): kvevict.cache_manager.per_head.
    per_head: bool = False
    # BudgetSpec.floor resolved: per-head allocators' alpha (each head keeps round(floor x
    # tokens)), epicache's layer floor fraction; None for allocators without one.
    floor: float | None = None
    # Hex SHA-256 of BudgetSpec.profile as received ("" without one): which profile decided.
    profile_sha256: str = ""
    # lukv: the profile's kept-fraction grid and its utility curves (layers, heads, grid),
    # float64 little-endian, base64: the decision needs exactly these numbers, and they are a
    # third of the JSON text's size.
    profile_grid: tuple[float, ...] = ()
    profile_curves: str = ""
    # epicache: the per-layer budgets the profile gave at open (they never change).
    layer_budgets: tuple[int, ...] = ()

    def policy(self) -> Wrapper:
        base = make_base(self.base, window=self.window, pool_kernel=self.pool_kernel, seed=self.seed)
        return make_policy(base, self.wrapper)

    def allocator(self) -> BudgetAllocator:
        """The per-layer allocator (not for per-head sessions: kvevict.cache_manager.per_head)."""
        return make_allocator(self.allocator_name, self.budget_tokens, self.sink, self.recent, self.wrapper,
                              budgets=self.layer_budgets)

    @cached_property
    def curves(self) -> np.ndarray:
        """lukv: the profile's utility curves (layers, heads, grid) float64, decoded once."""
        layers, heads = self.geometry.num_layers, self.geometry.num_kv_heads
        raw = base64.b64decode(self.profile_curves)
        return np.frombuffer(raw, dtype="<f8").reshape(layers, heads, len(self.profile_grid))

    @cached_property
    def hull(self) -> np.ndarray:
        """lukv: head_budgets.concave_hull of the curves, computed once per settings object."""
        return head_budgets.concave_hull(np.asarray(self.profile_grid), self.curves)

    @cached_property
    def json_text(self) -> str:
        """to_dict() as compact JSON with sorted keys, encoded once per settings object (every
        stored state carries it)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["statistics"] = [req.to_list() for req in self.statistics]
        for name in _OPTIONAL:
            if data[name] == _DEFAULTS[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionSettings:
        data = dict(data)
        data["geometry"] = Geometry(**data["geometry"])
        data["statistics"] = tuple(StatisticRequirement(*fields) for fields in data["statistics"])
        for name in ("profile_grid", "layer_budgets"):
            if name in data:
                data[name] = tuple(data[name])
        return cls(**data)


_OPTIONAL = ("per_head", "floor", "profile_sha256", "profile_grid", "profile_curves", "layer_budgets")
_DEFAULTS = {f.name: f.default for f in fields(SessionSettings) if f.name in _OPTIONAL}
# BudgetSpec.profile's size limit (the proto's).
MAX_PROFILE_BYTES = 1 << 20
_FLOOR_DEFAULTS = {"adahead": head_budgets.ADAHEAD_ALPHA, "global": head_budgets.ADAHEAD_ALPHA,
                   "lukv": head_budgets.ADAHEAD_ALPHA, "epicache": head_budgets.EPICACHE_FLOOR_FRACTION}
_NEEDS_PROFILE = ("lukv", "epicache")


def _floor(budget: pb.BudgetSpec, allocator: str) -> float | None:
    if not budget.HasField("floor"):
        return _FLOOR_DEFAULTS.get(allocator)
    if allocator not in _FLOOR_DEFAULTS:
        raise InvalidArgument("budget.floor", f"allocator {allocator} has no floor")
    floor = budget.floor
    if not (math.isfinite(floor) and 0.0 <= floor <= 1.0):
        raise InvalidArgument("budget.floor", f"must be a fraction of budget.tokens in [0, 1], got {floor}")
    return float(floor)


def _profile(budget: pb.BudgetSpec, allocator: str, geometry: Geometry) -> head_budgets.HeadProfile | None:
    """The request's head profile, checked against the allocator and the geometry."""
    raw = budget.profile
    if allocator not in _NEEDS_PROFILE:
        if raw:
            raise InvalidArgument("budget.profile", f"allocator {allocator} takes no profile")
        return None
    if not raw:
        raise InvalidArgument("budget.profile", f"{allocator} needs a head profile (written by `kvevict profile`)")
    if len(raw) > MAX_PROFILE_BYTES:
        raise InvalidArgument("budget.profile", f"{len(raw)} bytes, above the limit of {MAX_PROFILE_BYTES}")
    try:
        profile = head_budgets.HeadProfile.from_json(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise InvalidArgument("budget.profile", f"not a readable head profile ({error})") from None
    found = (profile.num_layers, profile.num_kv_heads)
    if found != (geometry.num_layers, geometry.num_kv_heads):
        raise InvalidArgument("budget.profile", f"the profile is of {found[0]} layers x {found[1]} KV heads, the "
                                                f"session's geometry {geometry.num_layers} x {geometry.num_kv_heads}")
    if allocator == "epicache" and not profile.sensitivity:
        raise InvalidArgument("budget.profile", "epicache needs the profile's layer sensitivity, which it lacks "
                                                "(profiled with --no-sensitivity)")
    return profile


def epicache_layer_budgets(profile: head_budgets.HeadProfile, tokens: int, floor: float, sink: int,
                           recent: int) -> list[int]:
    """epicache's per-layer budgets: HeadProfile.epicache with the layer floor max(1,
    int(floor x tokens), sink + recent + 1) (at the default floor exactly HeadProfile.epicache)."""
    layer_floor = max(1, int(tokens * floor), sink + recent + 1)
    if layer_floor > tokens:
        raise InvalidArgument("budget.floor", f"the layer floor {layer_floor} exceeds budget.tokens {tokens}")
    budgets = head_budgets.epicache_budgets(profile.sensitivity, tokens, profile.num_kv_heads, floor=layer_floor,
                                            sink=sink, recent=recent)
    return budgets[:, 0].tolist()


def settings_from_request(request: pb.OpenSessionRequest) -> SessionSettings:
    """Validates an OpenSessionRequest and resolves its defaults; InvalidArgument names the field."""
    geometry = Geometry.from_proto(request.geometry)
    if request.block_size <= 0:
        raise InvalidArgument("block_size", f"must be > 0, got {request.block_size}")
    dtype = request.statistics_dtype
    if dtype not in STATISTICS_DTYPES:
        raise InvalidArgument("statistics_dtype", f"must be unspecified, DTYPE_BFLOAT16, DTYPE_FLOAT16 or DTYPE_FLOAT32, got {dtype}")
    budget = request.budget
    if budget.tokens <= 0:
        raise InvalidArgument("budget.tokens", f"must be > 0, got {budget.tokens}")
    name = check_allocator_name(budget.allocator)
    per_head = name in PER_HEAD_ALLOCATORS
    if per_head and any(geometry.sliding_windows):
        raise InvalidArgument("budget.allocator", f"{name} gives every KV head its own budget, which sliding-window "
                                                  "layers do not support (their heads drop tokens together)")
    floor = _floor(budget, name)
    profile = _profile(budget, name, geometry)
    spec = request.policy
    base = make_base(spec.base, window=spec.window, pool_kernel=spec.pool_kernel, seed=spec.seed)
    policy = make_policy(base, spec.wrapper)
    sink = spec.sink_tokens if spec.HasField("sink_tokens") else base.default_sink
    # Defaults that depend on the budget use the average budget (uniform: every layer's).
    recent = spec.recent_tokens if spec.HasField("recent_tokens") else base.default_recent(budget.tokens)
    extra: dict[str, Any] = {}
    if profile is not None:
        extra["profile_sha256"] = hashlib.sha256(budget.profile).hexdigest()
    if per_head:
        if head_budgets.HEAD_ALLOCATORS[name].comparable_only:
            head_budgets.check_comparable(name, base.name, policy.name)
        # Every head's uniform budget must leave room for sink + recent, as every layer's does.
        validate_protection(sink, recent, [budget.tokens])
        extra.update(per_head=True, floor=floor)
        if name == "lukv":
            curves = np.ascontiguousarray(profile.curves, dtype="<f8")
            extra.update(profile_grid=profile.grid, profile_curves=base64.b64encode(curves.tobytes()).decode())
        allocator_name, tokens = name, budget.tokens
    else:
        layer_budgets: list[int] = []
        if name == "epicache":
            assert profile is not None and floor is not None
            validate_protection(sink, recent, [budget.tokens])
            layer_budgets = epicache_layer_budgets(profile, budget.tokens, floor, sink, recent)
            extra.update(floor=floor, layer_budgets=tuple(layer_budgets))
        allocator = make_allocator(name, budget.tokens, sink, recent, policy.name, budgets=layer_budgets)
        # Every layer's budget (pyramid: the smallest, top layer) must leave room for sink + recent.
        validate_protection(sink, recent, allocator.initial_budgets(geometry))
        allocator_name, tokens = allocator.name, allocator.tokens
    return SessionSettings(
        geometry=geometry,
        base=base.name,
        wrapper=policy.name,
        window=spec.window,
        pool_kernel=spec.pool_kernel,
        seed=spec.seed,
        sink=sink,
        recent=recent,
        budget_tokens=tokens,
        allocator_name=allocator_name,
        block_size=request.block_size,
        statistics_dtype=dtype,
        statistics=policy.required_statistics(),
        **extra,
    )
