"""The real-model suite's markdown document from results rows: the full cache per task, one
side-by-side table per protocol, each system's best where a peer ran, and each wrapper minus
its base paired by prompt (`benchmarks/suite.py table` and `kvevict eval` write it)."""

from __future__ import annotations

from collections.abc import Sequence

from kvevict.evaluation.suite_report import (SuiteRow, common_prompts, full_cache_agreement, is_full_cache,
                                             markdown_allocator_effects, markdown_best_of_each, markdown_full_cache,
                                             markdown_paired_effects, markdown_side_by_side)
from kvevict.evaluation.suite_runner import PROTOCOLS


def averaged_rows(rows: Sequence[SuiteRow]) -> tuple[list[SuiteRow], str]:
    """The rows of the prompts every configuration answered (so every cell averages the same
    prompts), and a note saying how many prompts that leaves when it drops some ("" if none)."""
    every = len({r.id for r in rows})
    kept = common_prompts(rows)
    common = len({r.id for r in kept})
    note = "" if common == every else (f"{common} of {every} prompts have every configuration's rows; the tables "
                                       "average those")
    return kept, note


def suite_markdown(rows: Sequence[SuiteRow], min_full_cache: float = 0.5, title: str = "Real-model suite") -> str:
    """The whole document, `# title` first; tasks the full cache scores below `min_full_cache`
    are shown in the full-cache table but stay out of every average."""
    protocols = [p for p in PROTOCOLS if any(r.protocol == p and not is_full_cache(r) for r in rows)]
    agreement = full_cache_agreement(rows)
    sections = ["## Full cache per task\n\n" + markdown_full_cache(rows, min_full_cache)
                + (f"\n\n{agreement}." if agreement else "")]
    for protocol in protocols:
        sections.append(f"## {protocol}\n\nscore (%), mean ± standard error over the prompts of the tasks the full "
                        f"cache answers >= {min_full_cache:.0%}\n\n"
                        + markdown_side_by_side(rows, protocol, min_full_cache))
        if any(r.system == "kvpress" and r.protocol == protocol and not is_full_cache(r) for r in rows):
            sections.append(f"### best of each system ({protocol})\n\n"
                            + markdown_best_of_each(rows, protocol, min_full_cache))
        effects = markdown_paired_effects(rows, protocol, min_full_cache)
        if effects.count("\n") > 1:  # a header alone: no wrapper ran beside its base
            sections.append(f"### wrapper minus base ({protocol}, kvevict, paired by prompt)\n\npoints; `*`: "
                            "beyond twice the standard error\n\n" + effects)
        allocators = markdown_allocator_effects(rows, protocol, min_full_cache)
        if allocators.count("\n") > 1:
            sections.append(f"### allocator minus uniform ({protocol}, kvevict, paired by prompt)\n\npoints; `*`: "
                            "beyond twice the standard error\n\n" + allocators)
    return f"# {title}\n\n" + "\n\n".join(sections) + "\n"
