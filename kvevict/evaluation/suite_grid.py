"""What the real-model suite's grid measures: which methods run under which protocol, on which
prompts, for kvevict and for kvpress, and in what order (benchmarks/suite.py `grid` runs it).

The headline grid (1k-token prompts, one prompt per task and seed, three seeds) was sized from
measured costs on 2 CPU cores, one torch thread per process: SmolLM2-135M in bfloat16 answers a
1k-token prompt in 1.8 s through kvevict's worker path (block-wise prefill with statistics, 4-25
decoded tokens) and about 2 s through kvpress. kvevict's plan is 153 configurations per prompt,
kvpress's 62 (KVzip reconstructs the context: about 3 prompts' worth), so a prompt costs about
7 core-minutes and 36 prompts (6 tasks x 3 seeds x 2) fill the 2 hours of 2 cores. The prompt
file is written in rounds (each round one prompt per task and seed), so a run cut short holds
every seed and task alike.
`--full` runs 4 prompts per task, seed and length at 1k, 2k and 4k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvevict.cache_manager.head_budgets import HEAD_ALLOCATORS
from kvevict.cli_options import STATISTICS_DTYPES
from kvevict.evaluation.runner import EvictionConfig
from kvevict.policy_names import format_policy, parse_policy

KEPT = (0.1, 0.2, 0.35, 0.5)
# Context tokens a reconstruction repeats at most (KVzip's chunk: the suite's 1k contexts whole).
RECONSTRUCT_CHUNK = 2048
BASES = ("h2o", "tova", "tova-mean", "snapkv", "keydiff", "streaming", "random")
WRAPPERS = ("none", "caote", "fastcaote")
# The three best configurations of the question-agnostic suite before this grid (n=15, 20% and
# 50% kept): they get the non-uniform allocators (adaptive ranks CAOTE-family errors only).
BEST = ("caote+keydiff", "fastcaote+keydiff", "keydiff")
ALLOCATOR_RUNS = tuple((m, a) for m in BEST for a in ("pyramid", "adaptive") if not (a == "adaptive" and "+" not in m))
# Question-aware: the window scorers (whose observation window the question's queries become)
# and the best configurations; one-shot: TOVA both ways (kvpress's TOVA gap) and the best.
AWARE = ("snapkv", "caote+snapkv", "tova", "keydiff", "caote+keydiff", "fastcaote+keydiff")
ONE_SHOT = ("tova", "tova-mean", "snapkv", "keydiff", "caote+keydiff", "fastcaote+keydiff")

KVPRESS = {
    "question_agnostic": ("Random", "StreamingLLM", "TOVA", "SnapKV", "ObservedAttention", "KeyDiff",
                          "ExpectedAttention", "CriticalKV(SnapKV)", "AdaKV(SnapKV)", "KVzip"),
    "question_aware": ("TOVA", "SnapKV", "KeyDiff", "CriticalKV(SnapKV)", "AdaKV(SnapKV)"),
}

# Tasks SmolLM2-135M-Instruct answers >= 50% with the full cache at 1k tokens (measured with
# plain transformers, benchmarks/results/suite/full_cache.md); the others are shown there only.
HEADLINE_TASKS = ("niah_single_number_noise", "niah_single_number_prose", "niah_single_uuid_noise",
                  "niah_single_uuid_prose", "niah_multikey_1", "niah_multivalue")


@dataclass(frozen=True)
class PromptPlan:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    n: int  # prompts per task, length and seed
    seeds: tuple[int, ...] = (0, 1, 2)


HEADLINE = PromptPlan(HEADLINE_TASKS, (1024,), 2)
FULL = PromptPlan(HEADLINE_TASKS, (1024, 2048, 4096), 4)


@dataclass(frozen=True)
class Job:
    """One kvevict measurement: a method (None: the full cache) under a protocol at a kept fraction."""

    method: str  # the policy spelling, with " (allocator)" when not uniform; "full cache"
    config: EvictionConfig | None
    protocol: str
    kept: float


def method_name(method: str, allocator: str, sink: int | None = None, lookahead: int = 0, reconstruct: int = 0,
                reconstruct_pool: str = "max", floor: float | None = None, recent: int | None = None,
                statistics_dtype: str = "auto") -> str:
    """The row's method: the policy spelling, then what runs beside it in parentheses (the
    reconstruction's chunk and pool only where they are not the defaults)."""
    name = method if allocator == "uniform" else f"{method} ({allocator})"
    floor = floor_of(allocator, floor)
    name = name if floor is None else f"{name} (floor {floor:g})"
    name = name if sink is None else f"{name} (sink {sink})"
    name = name if recent is None else f"{name} (recent {recent})"
    name = name if statistics_dtype == "auto" else f"{name} ({statistics_dtype} statistics)"
    name = name if not lookahead else f"{name} (lookahead {lookahead})"
    if reconstruct:
        detail = "".join([f" {reconstruct}" if reconstruct != RECONSTRUCT_CHUNK else "",
                          f" {reconstruct_pool}" if reconstruct_pool != "max" else ""])
        name = f"{name} (reconstruct{detail})"
    return name


def floor_of(allocator: str, floor: float | None) -> float | None:
    """The floor `allocator` is given: None for the allocators without one (uniform, pyramid,
    adaptive), which the manager would refuse it."""
    return floor if allocator in HEAD_ALLOCATORS else None


def method_config(method: str, allocator: str = "uniform", sink: int | None = None, lookahead: int = 0,
                  reconstruct: int = 0, reconstruct_pool: str = "max", profile: bytes = b"",
                  floor: float | None = None, recent: int | None = None, statistics_dtype: str = "auto"
                  ) -> EvictionConfig:
    base, wrapper = parse_policy(method, "--methods")
    # The manager refuses a profile the allocator does not read.
    reads_profile = allocator in HEAD_ALLOCATORS and HEAD_ALLOCATORS[allocator].needs_profile
    return EvictionConfig(base=base, wrapper=wrapper, allocator=allocator, sink=sink, recent=recent,
                          lookahead=lookahead,
                          reconstruct=reconstruct, reconstruct_pool=reconstruct_pool,
                          profile=profile if reads_profile else b"",
                          floor=floor_of(allocator, floor),
                          statistics_dtype=STATISTICS_DTYPES[statistics_dtype])


def kvevict_jobs(kept: tuple[float, ...] = KEPT) -> list[Job]:
    """Every kvevict configuration of the grid for one prompt, the full cache first."""
    runs = [(format_policy(b, w), "uniform", "question_agnostic") for b in BASES for w in WRAPPERS]
    runs += [(m, a, "question_agnostic") for m, a in ALLOCATOR_RUNS]
    runs += [(m, "uniform", "question_aware") for m in AWARE]
    runs += [(m, "uniform", "one_shot") for m in ONE_SHOT]
    jobs = [Job("full cache", None, "question_agnostic", 1.0)]
    jobs += [Job(method_name(m, a), method_config(m, a), p, k) for m, a, p in runs for k in kept]
    return jobs


def shard(items: list, index: int, count: int) -> list:
    """The items of shard `index` of `count` (round robin, so every shard gets every kind)."""
    if not 0 <= index < count:
        raise ValueError(f"--shard: index {index} is not in 0..{count - 1}")
    return items[index::count]
