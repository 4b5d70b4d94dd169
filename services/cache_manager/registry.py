"""What the manager offers: base policies, wrappers and allocators with their options and
defaults (for `kvevict policies` and for docs)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from kvevict.cache_manager.budgets import ALLOCATORS, PER_HEAD_ALLOCATORS, PROFILE_ALLOCATORS
from kvevict.cache_manager.head_budgets import ADAHEAD_ALPHA, EPICACHE_FLOOR_FRACTION, HEAD_ALLOCATORS
from kvevict.cache_manager.policies import BASE_POLICIES
from kvevict.cache_manager.statistics import VALUE_DEV_MEAN, StatisticRequirement
from kvevict.cache_manager.wrappers import WRAPPERS

# Budget-dependent defaults, in words (the values come from BasePolicy.default_recent).
_RECENT_DEFAULT = {"h2o": "budget // 2",
                   **{name: "min(window, budget // 2)" for name in ("snapkv", "querycaote", "obcv", "obck", "obcvk", "laprox")}}


@dataclass(frozen=True)
class OptionInfo:
    """One option: its PolicySpec/BudgetSpec field, default and meaning."""

    name: str
    default: str
    description: str


@dataclass(frozen=True)
class ComponentInfo:
    """One base policy, wrapper or allocator."""

    kind: str  # "base", "wrapper" or "allocator"
    name: str
    description: str
    statistics: tuple[str, ...] = ()  # with default options; wrappers: the statistic they add
    accumulates: bool = False
    options: tuple[OptionInfo, ...] = ()


def describe_policies() -> list[ComponentInfo]:
    """Every base policy, wrapper and allocator, in registry order."""
    out = []
    for name, cls in BASE_POLICIES.items():
        policy = cls()
        options = [
            OptionInfo("sink_tokens", str(cls.default_sink), "first tokens never evicted"),
            OptionInfo("recent_tokens", _RECENT_DEFAULT.get(name, "0"), "most recent tokens never evicted"),
        ]
        options += [OptionInfo(f.name, str(f.default), f.metadata.get("doc", "")) for f in fields(cls)]
        out.append(ComponentInfo(
            kind="base", name=name, description=cls.description,
            statistics=tuple(req.name for req in policy.required_statistics()),
            accumulates=cls.accumulates, options=tuple(options),
        ))
    added = {"none": (), "caote": ("value_dev_excluded(the base's reference weights)",), "fastcaote": (StatisticRequirement(VALUE_DEV_MEAN).name,)}
    for name, cls in WRAPPERS.items():
        out.append(ComponentInfo(kind="wrapper", name=name, description=cls.description, statistics=added[name]))
    tokens = OptionInfo("tokens", "required (> 0)", "average tokens kept per KV head per layer")
    profile = OptionInfo("profile", "required", "head profile JSON written by `kvevict profile` (at most 1 MiB), "
                                                "of the session's num_layers and num_kv_heads")
    for name, cls in ALLOCATORS.items():
        out.append(ComponentInfo(kind="allocator", name=name, description=cls.description, options=(tokens,)))
    for name, cls in PROFILE_ALLOCATORS.items():
        floor = OptionInfo("floor", str(EPICACHE_FLOOR_FRACTION), "each layer keeps at least floor x tokens")
        out.append(ComponentInfo(kind="allocator", name=name, description=cls.description,
                                 options=(tokens, floor, profile)))
    head_floor = OptionInfo("floor", str(ADAHEAD_ALPHA), "each KV head keeps at least round(floor x tokens)")
    for name in PER_HEAD_ALLOCATORS:
        info = HEAD_ALLOCATORS[name]
        options = (tokens, head_floor, profile) if info.needs_profile else (tokens, head_floor)
        out.append(ComponentInfo(kind="allocator", name=name, description=f"per KV head: {info.description}",
                                 options=options))
    return out


def format_policies() -> str:
    """describe_policies() as a plain-text table."""
    lines = []
    for info in describe_policies():
        extra = []
        if info.statistics:
            extra.append("statistics: " + ", ".join(info.statistics))
        if info.accumulates:
            extra.append("reports every block")
        if info.options:
            extra.append("options: " + ", ".join(f"{o.name}={o.default}" for o in info.options))
        lines.append(f"{info.kind:<9} {info.name:<10} {info.description}")
        lines += [f"{'':<20} {item}" for item in extra]
    return "\n".join(lines)
