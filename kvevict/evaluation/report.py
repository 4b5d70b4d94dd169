"""The quality benchmark's outputs: one CSV row per measurement, markdown tables of the mean and
spread over seeds, and PNG plots of quality against budget."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np

from kvevict.policy_names import format_policy

RETRIEVAL = "retrieval"
TEXT = "text"


@dataclass(frozen=True)
class Row:
    """One configuration at one budget on one seed's examples."""

    task: str  # "retrieval" or "text"
    model: str
    policy: str  # the configuration's name: `caote+h2o`, `control: recent window`, `full cache`
    base: str
    wrapper: str
    allocator: str
    budget_fraction: float  # of the context (retrieval) or window (text); 1.0 for the full cache
    budget_tokens: int
    context_tokens: int
    block_size: int
    seed: int
    examples: int  # prompts (retrieval) or windows (text)
    facts: int = 0  # retrieval: facts per prompt, asked and distractors (0 for text)
    accuracy: float = math.nan  # retrieval: questions answered exactly / asked
    needle_kept: float = math.nan  # retrieval: mean fraction of (layer, KV head) caches holding the answer
    # retrieval: accuracy on the questions whose fact token no cache held (the answer survived
    # only in other tokens' keys and values, or was guessed; chance is 1 / values)
    answered_without_needle: float = math.nan
    bits_per_byte: float = math.nan  # text
    bpb_gap: float = math.nan  # text: bits per byte minus the full cache's on the same windows
    seconds: float = 0.0


FIELDS = [f.name for f in fields(Row)]


def write_csv(rows: Iterable[Row], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})


REQUIRED_FIELDS = [f.name for f in fields(Row) if f.default is MISSING]


def read_csv(path: Path) -> list[Row]:
    """The rows `write_csv` wrote; columns it did not write, or missing ones it needs, raise ValueError."""
    types = {f.name: f.type for f in fields(Row)}
    out = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        unknown = [c for c in columns if c not in types]
        missing = [c for c in REQUIRED_FIELDS if c not in columns]
        if unknown or missing:
            raise ValueError(f"unknown columns {unknown}, missing columns {missing}")
        for line, record in enumerate(reader, start=2):
            try:
                out.append(Row(**{k: _parse(v, types[k]) for k, v in record.items()}))
            except (TypeError, ValueError) as error:
                raise ValueError(f"line {line}: {error}") from None
    return out


def _parse(value: str, kind: str):
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value) if value not in ("", "nan") else math.nan
    return value


# -- aggregation ----------------------------------------------------------------------------
def metric_of(task: str) -> str:
    return "accuracy" if task == RETRIEVAL else "bpb_gap"


@dataclass(frozen=True)
class Cell:
    mean: float
    spread: float  # sample standard deviation over seeds (0 with one seed)
    seeds: int


def aggregate(rows: Sequence[Row], metric: str) -> dict[tuple[str, str, float], Cell]:
    """(policy, allocator, budget fraction) -> mean and spread of `metric` over seeds."""
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for row in rows:
        groups[(row.policy, row.allocator, row.budget_fraction)].append(getattr(row, metric))
    return {key: _cell(values) for key, values in groups.items()}


def _cell(values: Sequence[float]) -> Cell:
    array = np.asarray(values, dtype=np.float64)
    spread = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return Cell(float(array.mean()), spread, int(array.size))


def paired_differences(rows: Sequence[Row], metric: str, wrapper: str,
                       against: str = "none") -> dict[tuple[str, str, float], Cell]:
    """(base, allocator, budget) -> `wrapper` minus `against` on the same seeds' examples."""
    by_key = {(r.base, r.wrapper, r.allocator, r.budget_fraction, r.seed): getattr(r, metric)
              for r in rows if not r.policy.startswith(("control", "full"))}
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for (base, wrap, allocator, budget, seed), value in by_key.items():
        other = by_key.get((base, against, allocator, budget, seed))
        if wrap == wrapper and other is not None:
            groups[(base, allocator, budget)].append(value - other)
    return {key: _cell(values) for key, values in groups.items()}


# -- markdown -------------------------------------------------------------------------------
def _format(cell: Cell | None, percent: bool) -> str:
    if cell is None:
        return ""
    if percent:
        return f"{100 * cell.mean:.1f} ± {100 * cell.spread:.1f}"
    return f"{cell.mean:.3f} ± {cell.spread:.3f}"


def policy_order(rows: Sequence[Row]) -> list[str]:
    """Policies in first-seen order, the full cache first."""
    seen = dict.fromkeys(r.policy for r in rows if r.policy == "full cache")
    seen.update(dict.fromkeys(r.policy for r in rows))
    return list(seen)


TITLES = {
    "accuracy": "accuracy (%)",
    "needle_kept": "answer's fact token still cached when its question is read (% of layer x KV-head caches)",
    "bpb_gap": "bits per byte above the full cache",
}
PERCENT_METRICS = ("accuracy", "needle_kept", "answered_without_needle")


def markdown_table(rows: Sequence[Row], task: str, allocator: str = "uniform", metric: str | None = None) -> str:
    """Policies x budgets for one task and allocator (controls and the full cache included);
    `metric` defaults to the task's own (accuracy, or the bits-per-byte gap)."""
    rows = [r for r in rows if r.task == task]
    metric = metric or metric_of(task)
    cells = aggregate(rows, metric)
    budgets = sorted({r.budget_fraction for r in rows if r.budget_fraction < 1.0})
    percent = metric in PERCENT_METRICS
    full = [c for (p, _, _), c in cells.items() if p == "full cache"]
    header = "| policy | " + " | ".join(f"{b:.0%}" for b in budgets) + " |"
    lines = [header, "|---|" + "---|" * len(budgets)]
    for policy in policy_order(rows):
        if policy == "full cache":
            continue
        chosen = allocator if not policy.startswith("control") else "uniform"
        if not any((policy, chosen, b) in cells for b in budgets):
            continue
        lines.append(f"| {policy} | " + " | ".join(_format(cells.get((policy, chosen, b)), percent)
                                                for b in budgets) + " |")
    note = ""
    if full and metric == "accuracy":
        note = f"Full cache: {_format(full[0], True)} % accuracy."
    elif full and metric == "bpb_gap":
        bpb = aggregate([r for r in rows if r.policy == "full cache"], "bits_per_byte")
        note = f"Full cache: {_format(next(iter(bpb.values())), False)} bits per byte."
    title = TITLES.get(metric, metric)
    return f"{title}, allocator `{allocator}`, mean ± standard deviation over seeds. {note}".rstrip() + "\n\n" + "\n".join(lines)


def markdown_allocators(rows: Sequence[Row], task: str, wrappers: Sequence[str] = ("caote", "fastcaote")) -> str:
    """For CAOTE-wrapped policies: each allocator at each budget."""
    rows = [r for r in rows if r.task == task and r.wrapper in wrappers]
    metric = metric_of(task)
    cells = aggregate(rows, metric)
    budgets = sorted({r.budget_fraction for r in rows})
    allocators = list(dict.fromkeys(r.allocator for r in rows))
    percent = metric in PERCENT_METRICS
    lines = ["| policy | allocator | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for policy in policy_order(rows):
        for allocator in allocators:
            if any((policy, allocator, b) in cells for b in budgets):
                lines.append(f"| {policy} | {allocator} | " + " | ".join(
                    _format(cells.get((policy, allocator, b)), percent) for b in budgets) + " |")
    return "\n".join(lines)


def markdown_effects(rows: Sequence[Row], task: str, wrapper: str, allocator: str = "uniform") -> str:
    """`wrapper` minus no wrapper per base and budget, paired by seed; `*` where the mean exceeds
    twice its standard error (sd / sqrt(seeds))."""
    rows = [r for r in rows if r.task == task]
    metric = metric_of(task)
    cells = paired_differences(rows, metric, wrapper)
    budgets = sorted({b for (_, a, b) in cells if a == allocator})
    bases = list(dict.fromkeys(base for (base, a, _) in cells if a == allocator))
    percent = metric in PERCENT_METRICS
    lines = ["| base | " + " | ".join(f"{b:.0%}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for base in bases:
        out = []
        for budget in budgets:
            cell = cells.get((base, allocator, budget))
            if cell is None:
                out.append("")
                continue
            significant = cell.seeds > 1 and abs(cell.mean) > 2 * cell.spread / math.sqrt(cell.seeds)
            out.append(_format(cell, percent) + (" *" if significant else ""))
        lines.append(f"| {base} | " + " | ".join(out) + " |")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------
def _panels(count: int):
    """A figure with one panel per item, three to a line, sharing the y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, max(1, count))
    lines = max(1, math.ceil(count / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.3 * lines), squeeze=False, sharey=True)
    flat = [axis for line in axes for axis in line]
    for axis in flat[count:]:
        axis.axis("off")
    return figure, flat[:count]


def _curve(axis, cells: dict, policy: str, allocator: str | None, scale: float, style: str, label: str,
           bars: bool = True) -> None:
    """`policy` (under `allocator`; None = any) against budget, error bars = spread over seeds."""
    points = sorted((b, c) for (p, a, b), c in cells.items() if p == policy and allocator in (None, a))
    if not points:
        return
    x, y = [100 * b for b, _ in points], [scale * c.mean for _, c in points]
    if bars:
        axis.errorbar(x, y, yerr=[scale * c.spread for _, c in points], fmt=style, capsize=2, label=label)
    else:
        axis.plot(x, y, style, color="gray", label=label)


def _finish(figure, axes, task: str, titles: Sequence[str], title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for index, (axis, name) in enumerate(zip(axes, titles)):
        axis.set_title(name)
        axis.set_xlabel("budget (% of context)")
        axis.grid(alpha=0.3)
        if index % 3 == 0:
            axis.set_ylabel("accuracy (%)" if task == RETRIEVAL else "bits/byte above full cache")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_by_base(rows: Sequence[Row], task: str, path: Path, allocator: str = "uniform") -> Path:
    """One panel per base: the metric against budget for each wrapper, with the controls and the
    full cache as references; error bars are the spread over seeds."""
    rows = [r for r in rows if r.task == task]
    cells = aggregate(rows, metric_of(task))
    bases = list(dict.fromkeys(r.base for r in rows if not r.policy.startswith(("control", "full"))))
    controls = [p for p in policy_order(rows) if p.startswith("control")]
    scale = 100.0 if task == RETRIEVAL else 1.0
    full = [c.mean for (p, _, _), c in cells.items() if p == "full cache"]
    figure, axes = _panels(len(bases))
    for axis, base in zip(axes, bases):
        for wrapper, style in (("none", "o-"), ("caote", "s-"), ("fastcaote", "^-")):
            policy = format_policy(base, wrapper)
            _curve(axis, cells, policy, allocator, scale, style, policy)
        for control, style in zip(controls, (":", "--")):
            _curve(axis, cells, control, None, scale, style, control.removeprefix("control: "), bars=False)
        reference = 0.0 if task == TEXT else (scale * full[0] if full else None)
        if reference is not None:
            axis.axhline(reference, color="black", linewidth=0.8, label="full cache")
    model = Path(rows[0].model).name if rows else ""
    return _finish(figure, axes, task, bases, f"{task}: {model}, allocator {allocator}", path)


def plot_allocators(rows: Sequence[Row], task: str, path: Path, wrapper: str = "caote") -> Path:
    """One panel per base: the metric against budget for each allocator, `wrapper` policies."""
    rows = [r for r in rows if r.task == task and r.wrapper == wrapper]
    cells = aggregate(rows, metric_of(task))
    bases = list(dict.fromkeys(r.base for r in rows))
    scale = 100.0 if task == RETRIEVAL else 1.0
    figure, axes = _panels(len(bases))
    for axis, base in zip(axes, bases):
        for allocator, style in zip(dict.fromkeys(r.allocator for r in rows), ("o-", "s-", "^-")):
            _curve(axis, cells, format_policy(base, wrapper), allocator, scale, style, allocator)
    return _finish(figure, axes, task, [format_policy(b, wrapper) for b in bases], f"{task}: allocators under {wrapper}",
                   path)
