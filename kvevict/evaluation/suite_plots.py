"""Plots of the real-model suite: score against kept fraction, error bars one standard error
over prompts (the included tasks only, as in the tables)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kvevict.evaluation.suite_report import Cell, SuiteRow, protocol_cells
from kvevict.policy_names import format_policy

WRAPPER_STYLES = (("none", "o-"), ("caote", "s-"), ("fastcaote", "^-"))
BEST_SHOWN = 4  # methods per system in the side-by-side plot


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, max(1, panels))
    lines = -(-panels // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4.0 * columns, 3.2 * lines), squeeze=False, sharey=True)
    flat = [axis for line in axes for axis in line]
    for axis in flat[panels:]:
        axis.axis("off")
    return plt, figure, flat[:panels]


def _curve(axis, cells: dict[tuple[str, str, float], Cell], system: str, method: str, style: str, label: str) -> bool:
    points = sorted((k, c) for (s, m, k), c in cells.items() if s == system and m == method and k < 1.0)
    if not points:
        return False
    axis.errorbar([100 * k for k, _ in points], [100 * c.mean for _, c in points],
                  yerr=[100 * c.stderr for _, c in points], fmt=style, capsize=2, label=label)
    return True


def _full_cache(axis, cells: dict[tuple[str, str, float], Cell]) -> None:
    full = [c.mean for (s, _, k), c in cells.items() if k >= 1.0 and s == "kvevict"]
    if full:
        axis.axhline(100 * full[0], color="black", linewidth=0.8, label="full cache")


def _save(plt, figure, axes, titles: Sequence[str], title: str, path: Path) -> Path:
    for index, (axis, name) in enumerate(zip(axes, titles)):
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("kept (% of context)")
        axis.grid(alpha=0.3)
        if index % 4 == 0:
            axis.set_ylabel("score (%)")
        axis.legend(fontsize=6)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_by_base(rows: Sequence[SuiteRow], path: Path, protocol: str = "question_agnostic",
                 min_full_cache: float = 0.5) -> Path | None:
    """One panel per kvevict base: the base, CAOTE and FastCAOTE around it (uniform budgets)."""
    cells = protocol_cells(rows, protocol, min_full_cache)
    methods = {m for s, m, _ in cells if s == "kvevict"}
    bases = list(dict.fromkeys(m.split("+")[-1] for s, m, k in cells
                               if s == "kvevict" and k < 1.0 and "(" not in m))
    if not bases:
        return None
    plt, figure, axes = _figure(len(bases))
    for axis, base in zip(axes, bases):
        for wrapper, style in WRAPPER_STYLES:
            method = format_policy(base, wrapper)
            if method in methods:
                _curve(axis, cells, "kvevict", method, style, method)
        _full_cache(axis, cells)
    return _save(plt, figure, axes, bases, f"kvevict by base ({protocol})", path)


def plot_side_by_side(rows: Sequence[SuiteRow], path: Path, protocols: Sequence[str],
                      min_full_cache: float = 0.5) -> Path | None:
    """One panel per protocol: the best methods of each system (by mean over kept fractions)."""
    shown = []
    for protocol in protocols:
        cells = protocol_cells(rows, protocol, min_full_cache)
        if any(k < 1.0 for _, _, k in cells):
            shown.append((protocol, cells))
    if not shown:
        return None
    plt, figure, axes = _figure(len(shown))
    for axis, (_, cells) in zip(axes, shown):
        for system, style in (("kvevict", "-"), ("kvpress", "--")):
            means: dict[str, list[float]] = {}
            for (s, m, k), c in cells.items():
                if s == system and k < 1.0:
                    means.setdefault(m, []).append(c.mean)
            best = sorted(means, key=lambda m: -sum(means[m]) / len(means[m]))[:BEST_SHOWN]
            for method, marker in zip(best, "osv^"):
                _curve(axis, cells, system, method, marker + style, f"{system}: {method}")
        _full_cache(axis, cells)
    return _save(plt, figure, axes, [p for p, _ in shown], "best methods of each system", path)


def plot_suite(rows: Sequence[SuiteRow], directory: Path, min_full_cache: float = 0.5) -> list[Path]:
    """Every suite plot that the rows can fill, as PNG files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_by_base(rows, directory / "suite_by_base.png", min_full_cache=min_full_cache),
               plot_side_by_side(rows, directory / "suite_side_by_side.png",
                                 ("question_agnostic", "question_aware", "one_shot"), min_full_cache)]
    return [path for path in written if path is not None]
