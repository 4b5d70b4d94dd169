"""The benchmark's grid of configurations and its tables: every configuration is one the manager
accepts, and the tables' means, spreads and paired differences are what the rows say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvevict.cache_manager.service import ManagerCore
from kvevict.cache_manager.state import InMemoryStateStore
from kvevict.evaluation import grid, report
from kvevict.evaluation.report import Row
from kvevict.v1 import cache_manager_pb2 as pb


def test_grid_is_every_accepted_combination_plus_controls() -> None:
    configs = grid.configurations()
    names = [(c.base, c.wrapper, c.allocator) for c in configs if not c.label]
    assert len(names) == len(set(names))
    # adaptive ranks output errors across layers: CAOTE wrappers only.
    assert len(names) == 6 * 3 * 2 + 6 * 2
    assert {w for (_, w, a) in names if a == "adaptive"} == {"caote", "fastcaote"}
    assert [c.label for c in configs if c.label] == ["control: recent window", "control: value norm"]


@pytest.mark.parametrize("fraction", grid.BUDGET_FRACTIONS)
def test_every_configuration_opens_a_session(fraction: float) -> None:
    core = ManagerCore(InMemoryStateStore())
    geometry = pb.ModelGeometry(num_layers=4, num_kv_heads=2, num_query_heads=4, head_dim=32)
    budget = grid.budget_tokens(fraction, 1024)
    for config in grid.configurations():
        settings = config.settings(budget, 64, seed=1)
        opened = core.open_session(pb.OpenSessionRequest(geometry=geometry, policy=settings.policy,
                                                         budget=settings.budget, block_size=64))
        assert sum(opened.layer_budgets) == 4 * budget, config.name


def test_budget_tokens_rejects_fractions_outside_the_unit_interval() -> None:
    assert grid.budget_tokens(0.05, 1024) == 51
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="budget fractions"):
            grid.budget_tokens(bad, 1024)


def _row(policy, base, wrapper, budget, seed, accuracy, allocator="uniform"):
    return Row(task="retrieval", model="m", policy=policy, base=base, wrapper=wrapper, allocator=allocator,
               budget_fraction=budget, budget_tokens=int(budget * 100), context_tokens=100, block_size=10,
               seed=seed, examples=4, accuracy=accuracy, needle_kept=accuracy)


def test_aggregates_paired_differences_and_tables() -> None:
    rng = np.random.default_rng(0)
    plain = rng.random(3)
    lift = np.array([0.1, 0.2, 0.15])
    rows = [_row("h2o", "h2o", "none", 0.1, s, plain[s]) for s in range(3)]
    rows += [_row("caote+h2o", "h2o", "caote", 0.1, s, plain[s] + lift[s]) for s in range(3)]
    rows += [_row("full cache", "streaming", "none", 1.0, s, 0.9) for s in range(3)]
    cells = report.aggregate(rows, "accuracy")
    assert cells[("h2o", "uniform", 0.1)].mean == pytest.approx(plain.mean())
    assert cells[("h2o", "uniform", 0.1)].spread == pytest.approx(plain.std(ddof=1))
    effect = report.paired_differences(rows, "accuracy", "caote")[("h2o", "uniform", 0.1)]
    assert effect.mean == pytest.approx(lift.mean()) and effect.spread == pytest.approx(lift.std(ddof=1))
    table = report.markdown_table(rows, "retrieval")
    assert f"| caote+h2o | {100 * (plain + lift).mean():.1f} ± {100 * (plain + lift).std(ddof=1):.1f} |" in table
    assert "Full cache: 90.0 ± 0.0 % accuracy." in table
    # The lift (0.15 +- 0.05, 3 seeds) exceeds twice its standard error: flagged.
    assert report.markdown_effects(rows, "retrieval", "caote").splitlines()[-1].endswith("* |")


def test_csv_round_trip(tmp_path) -> None:
    rows = [_row("h2o", "h2o", "none", 0.1, 0, 0.25), _row("h2o", "h2o", "none", 0.2, 1, math.nan)]
    report.write_csv(rows, tmp_path / "q.csv")
    back = report.read_csv(tmp_path / "q.csv")
    assert back[0] == rows[0]
    assert math.isnan(back[1].accuracy) and back[1].budget_tokens == 20


def test_read_csv_names_what_is_wrong(tmp_path) -> None:
    path = tmp_path / "q.csv"
    report.write_csv([_row("h2o", "h2o", "none", 0.1, 0, 0.25)], path)
    header, line = path.read_text().splitlines()
    (tmp_path / "extra.csv").write_text(header + ",score\n" + line + ",1\n")
    with pytest.raises(ValueError, match=r"unknown columns \['score'\]"):
        report.read_csv(tmp_path / "extra.csv")
    (tmp_path / "short.csv").write_text(header.replace("seed,", "") + "\n")
    with pytest.raises(ValueError, match=r"missing columns \['seed'\]"):
        report.read_csv(tmp_path / "short.csv")
    (tmp_path / "typo.csv").write_text(header + "\n" + line.replace(",0.1,", ",ten,", 1) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        report.read_csv(tmp_path / "typo.csv")
