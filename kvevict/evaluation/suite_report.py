"""The real-model suite's results: one CSV row per (system, method, protocol, kept fraction,
prompt), shared with the kvpress runner (benchmarks/peers/kvpress/run.py writes the same
columns), and the side-by-side markdown tables.

A table's cell is the mean score over prompts of the included tasks, with its standard error
and n. Tasks the full cache does poorly on (below `min_full_cache`) are shown per task but left
out of the average: eviction cannot lose what the model never had.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FULL_CACHE = "full cache"  # kvevict's name for it; a peer's full cache is its kept fraction 1.0 ("none")


def is_full_cache(row: "SuiteRow") -> bool:
    return row.kept_fraction >= 1.0


@dataclass(frozen=True)
class SuiteRow:
    system: str  # kvevict | kvpress
    method: str  # the system's own spelling (caote+snapkv, SnapKV, full cache)
    protocol: str  # question_agnostic | question_aware | one_shot
    kept_fraction: float
    id: str
    task: str
    length: int
    score: float
    prediction: str
    seconds: float


FIELDS = [f.name for f in fields(SuiteRow)]


def append_rows(rows: Iterable[SuiteRow], path: Path) -> None:
    """Appends to a results CSV (its header first when it is new)."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_rows(path: Path) -> list[SuiteRow]:
    """The rows of a results CSV; ValueError names the file and line of a bad row."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != FIELDS:
            raise ValueError(f"{path}: columns {reader.fieldnames} are not {FIELDS}")
        for line, record in enumerate(reader, start=2):
            try:
                rows.append(SuiteRow(system=record["system"], method=record["method"], protocol=record["protocol"],
                                     kept_fraction=float(record["kept_fraction"]), id=record["id"],
                                     task=record["task"], length=int(record["length"]), score=float(record["score"]),
                                     prediction=record["prediction"], seconds=float(record["seconds"])))
            except ValueError as error:
                raise ValueError(f"{path}:{line}: {error}") from None
    return rows


def common_prompts(rows: Sequence[SuiteRow]) -> list[SuiteRow]:
    """The rows of the prompts that every configuration (system, method, protocol, kept
    fraction) answered, so that every cell of a table averages the same prompts."""
    by_config: dict[tuple[str, str, str, float], set[str]] = defaultdict(set)
    for r in rows:
        by_config[(r.system, r.method, r.protocol, r.kept_fraction)].add(r.id)
    common = set.intersection(*by_config.values()) if by_config else set()
    return [r for r in rows if r.id in common]


def done_keys(path: Path) -> set[tuple[str, str, str, float, str]]:
    """(system, method, protocol, kept_fraction, id) already measured (a resumed run skips them)."""
    if not path.exists():
        return set()
    return {(r.system, r.method, r.protocol, r.kept_fraction, r.id) for r in read_rows(path)}


@dataclass(frozen=True)
class Cell:
    mean: float
    stderr: float
    n: int
    seconds: float  # mean wall time per prompt


def _cell(rows: Sequence[SuiteRow]) -> Cell:
    scores = [r.score for r in rows]
    n = len(scores)
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    return Cell(mean, math.sqrt(var / n), n, sum(r.seconds for r in rows) / n)


def full_cache_accuracy(rows: Sequence[SuiteRow]) -> dict[tuple[str, int], Cell]:
    """(task, length) -> the full cache's score (any system's full-cache rows; kvevict's first)."""
    groups: dict[tuple[str, int], list[SuiteRow]] = defaultdict(list)
    systems = sorted({r.system for r in rows if is_full_cache(r)}, key=lambda s: s != "kvevict")
    for row in rows:
        if is_full_cache(row) and systems and row.system == systems[0]:
            groups[(row.task, row.length)].append(row)
    return {key: _cell(group) for key, group in groups.items()}


def included_tasks(rows: Sequence[SuiteRow], min_full_cache: float) -> set[tuple[str, int]]:
    return {key for key, cell in full_cache_accuracy(rows).items() if cell.mean >= min_full_cache}


def method_order(rows: Sequence[SuiteRow]) -> list[tuple[str, str]]:
    """(system, method): the full cache first, then kvevict's methods, then each peer's."""
    full = {(r.system, r.method) for r in rows if is_full_cache(r)}
    seen = list(dict.fromkeys((r.system, r.method) for r in rows))
    return sorted(seen, key=lambda sm: (sm not in full, sm[0] != "kvevict", sm[0]))


def _format(cell: Cell | None) -> str:
    if cell is None:
        return ""
    return f"{100 * cell.mean:.1f} ± {100 * cell.stderr:.1f} (n={cell.n})"


def protocol_cells(rows: Sequence[SuiteRow], protocol: str,
                   min_full_cache: float = 0.5) -> dict[tuple[str, str, float], Cell]:
    """(system, method, kept fraction) -> Cell over the prompts of the included tasks under
    `protocol`; full caches at kept fraction 1.0."""
    included = included_tasks(rows, min_full_cache)
    rows = [r for r in rows if (r.task, r.length) in included and (r.protocol == protocol or is_full_cache(r))]
    # A peer writes its full cache once per protocol it runs: take this protocol's, else the
    # question-agnostic one (kvevict's full cache is one, whatever the protocol).
    full_protocol = {}
    for system in {r.system for r in rows if is_full_cache(r)}:
        protocols = {r.protocol for r in rows if r.system == system and is_full_cache(r)}
        full_protocol[system] = protocol if protocol in protocols else (
            "question_agnostic" if "question_agnostic" in protocols else min(protocols))
    groups: dict[tuple[str, str, float], list[SuiteRow]] = defaultdict(list)
    for row in rows:
        if is_full_cache(row) and row.protocol != full_protocol[row.system]:
            continue
        groups[(row.system, row.method, row.kept_fraction)].append(row)
    return {key: _cell(group) for key, group in groups.items()}


def markdown_side_by_side(rows: Sequence[SuiteRow], protocol: str, min_full_cache: float = 0.5) -> str:
    """Rows: method of either system; columns: kept fraction; cells: mean ± standard error (n) in
    %, over the prompts of the tasks the full cache does well on; and seconds per prompt."""
    cells = protocol_cells(rows, protocol, min_full_cache)
    if not cells:
        return ""
    fractions = sorted({k for _, _, k in cells if k < 1.0})
    full = {(s, m) for s, m, k in cells if k >= 1.0}
    lines = ["| system | method | " + " | ".join(f"{f:.0%}" for f in fractions) + " | s/prompt |",
             "|---|---|" + "---|" * (len(fractions) + 1)]
    present = [r for r in rows if (r.system, r.method, r.kept_fraction) in cells]
    for system, method in method_order(present):
        if (system, method) in full:
            cell = cells[(system, method, 1.0)]
            row_cells = [_format(cell)] * len(fractions)
            seconds = cell.seconds
        else:
            found = [cells.get((system, method, f)) for f in fractions]
            row_cells = [_format(c) for c in found]
            measured = [c for c in found if c]
            seconds = sum(c.seconds for c in measured) / len(measured) if measured else math.nan
        lines.append(f"| {system} | {method} | " + " | ".join(row_cells) + f" | {seconds:.2f} |")
    return "\n".join(lines)


def _paired(diffs: Sequence[float]) -> str:
    """Mean ± standard error of paired differences in points, `*` beyond twice it, and n."""
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else 0.0
    star = "*" if se > 0 and abs(mean) > 2 * se else ""
    return f"{100 * mean:+.1f} ± {100 * se:.1f}{star} (n={n})"


def markdown_best_of_each(rows: Sequence[SuiteRow], protocol: str, min_full_cache: float = 0.5,
                          system: str = "kvevict", peer: str = "kvpress") -> str:
    """Per kept fraction, on the prompts every method of both systems answered there: each
    system's best method (highest mean) and the best minus the peer's best paired by prompt, in
    points. Picking the best of many favours each system alike; the paired standard error is the
    noise of the difference."""
    included = included_tasks(rows, min_full_cache)
    scores: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.protocol == protocol and r.system in (system, peer) and not is_full_cache(r) \
                and (r.task, r.length) in included:
            scores[(r.system, r.method, r.kept_fraction)][r.id] = r.score
    fractions = sorted({k for s, _, k in scores if s == system} & {k for s, _, k in scores if s == peer})
    lines = [f"| kept | {system} best | {peer} best | difference, paired |", "|---|---|---|---|"]
    for fraction in fractions:
        methods = {key: by_id for key, by_id in scores.items() if key[2] == fraction}
        common = set.intersection(*(set(by_id) for by_id in methods.values()))
        if not common:
            continue
        best = {}
        for name in (system, peer):
            best[name] = max((sum(by_id[i] for i in common) / len(common), m)
                             for (s, m, _), by_id in methods.items() if s == name)
        ours, theirs = methods[(system, best[system][1], fraction)], methods[(peer, best[peer][1], fraction)]
        difference = _paired([ours[i] - theirs[i] for i in sorted(common)])
        lines.append(f"| {fraction:.0%} | {best[system][1]}: {100 * best[system][0]:.1f} | "
                     f"{best[peer][1]}: {100 * best[peer][0]:.1f} | {difference} |")
    return "\n".join(lines)


def full_cache_agreement(rows: Sequence[SuiteRow], system: str = "kvevict", reference: str = "transformers") -> str:
    """How many prompts `system`'s full cache answers with exactly `reference`'s prediction."""
    ours = {r.id: r.prediction for r in rows if r.system == system and is_full_cache(r)}
    theirs = {r.id: r.prediction for r in rows if r.system == reference and is_full_cache(r)}
    common = sorted(set(ours) & set(theirs))
    if not common:
        return ""
    differ = [i for i in common if ours[i] != theirs[i]]
    text = (f"{system}'s full cache predicts exactly what {reference} predicts on {len(common) - len(differ)} "
            f"of {len(common)} prompts")
    return text + (f"; differs on {', '.join(differ)}" if differ else "")


def markdown_full_cache(rows: Sequence[SuiteRow], min_full_cache: float = 0.5) -> str:
    """The full cache's score per task (rows) and length (columns); `*` marks the (task, length)
    cells below `min_full_cache`, which stay out of the averages."""
    cells = full_cache_accuracy(rows)
    lengths = sorted({length for _, length in cells})
    tasks = sorted({task for task, _ in cells})
    lines = ["| task | " + " | ".join(f"{length} tokens" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task in tasks:
        row = []
        for length in lengths:
            cell = cells.get((task, length))
            row.append("" if cell is None else _format(cell) + (" *" if cell.mean < min_full_cache else ""))
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines) + f"\n\n`*`: below {min_full_cache:.0%}, shown but left out of the averages"


# Allocators a row's method names in parentheses ("snapkv (adahead)"): the uniform row has none.
# Spelled out, not imported: this module stays standard-library only (a test holds it to the
# manager's list).
ROW_ALLOCATORS = ("pyramid", "adaptive", "epicache", "adahead", "global", "lukv")


def uniform_counterpart(method: str) -> str | None:
    """The uniform allocator's row of an allocator's row: `snapkv (adahead) (reconstruct)` ->
    `snapkv (reconstruct)`; None for a uniform row.

    >>> uniform_counterpart("caote+snapkv (global) (reconstruct)"), uniform_counterpart("snapkv")
    ('caote+snapkv (reconstruct)', None)
    """
    for allocator in ROW_ALLOCATORS:
        marker = f" ({allocator})"
        if marker in method:
            return method.replace(marker, "", 1)
    return None


def markdown_allocator_effects(rows: Sequence[SuiteRow], protocol: str, min_full_cache: float = 0.5,
                               system: str = "kvevict") -> str:
    """Each allocator's row minus the same method under the uniform allocator, paired by prompt
    and kept fraction, as markdown_paired_effects pairs wrappers with their bases."""
    scores = _method_scores(rows, protocol, min_full_cache, system)
    names = {m for m, _, _ in scores}
    return _paired_table(scores, sorted((m, uniform_counterpart(m)) for m in names if uniform_counterpart(m) in names))


def markdown_paired_effects(rows: Sequence[SuiteRow], protocol: str, min_full_cache: float = 0.5,
                            system: str = "kvevict") -> str:
    """Each wrapped method minus its base (`caote+snapkv` - `snapkv`), paired by prompt and kept
    fraction: mean ± standard error in points, and how many prompts it answered better / worse.
    `*` marks a mean beyond twice its standard error."""
    scores = _method_scores(rows, protocol, min_full_cache, system)
    names = {m for m, _, _ in scores}
    wrapped = sorted(m for m in names if "+" in m and m.split("+", 1)[1] in names)
    return _paired_table(scores, [(m, m.split("+", 1)[1]) for m in wrapped])


def _method_scores(rows: Sequence[SuiteRow], protocol: str, min_full_cache: float,
                   system: str) -> dict[tuple[str, float, str], float]:
    """(method, kept fraction, prompt id) -> score of `system`'s rows of the included tasks."""
    included = included_tasks(rows, min_full_cache)
    return {(r.method, r.kept_fraction, r.id): r.score for r in rows
            if r.system == system and r.protocol == protocol and not is_full_cache(r)
            and (r.task, r.length) in included}


def _paired_table(scores: dict[tuple[str, float, str], float], pairs: Sequence[tuple[str, str]]) -> str:
    """One row per (method, reference) pair: the method minus the reference at each kept
    fraction, paired by prompt, with the prompts it answered better / worse."""
    fractions = sorted({k for _, k, _ in scores})
    lines = ["| method | " + " | ".join(f"{f:.0%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for method, reference in pairs:
        cells = []
        for fraction in fractions:
            diffs = [scores[(method, fraction, i)] - s for (m, k, i), s in scores.items()
                     if m == reference and k == fraction and (method, fraction, i) in scores]
            if not diffs:
                cells.append("")
                continue
            better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            cells.append(_paired(diffs)[:-1] + f"; {better} better, {worse} worse)")
        lines.append(f"| {method} - {reference} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
