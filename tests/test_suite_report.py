"""The suite's tables on hand-made rows: means and standard errors, tasks the full cache fails
left out, each system's best paired by prompt, the full cache's agreement with transformers."""

from __future__ import annotations

import math

from kvevict.evaluation.suite_report import (SuiteRow, common_prompts, full_cache_agreement,
                                             markdown_allocator_effects, markdown_best_of_each, markdown_full_cache,
                                             markdown_paired_effects, markdown_side_by_side, protocol_cells)

AGNOSTIC = "question_agnostic"


def row(system: str, method: str, kept: float, prompt: int, score: float, task: str = "niah", protocol: str = AGNOSTIC,
        prediction: str = "p") -> SuiteRow:
    return SuiteRow(system, method, protocol, kept, f"{task}/1024/{prompt:04d}", task, 1024, score, prediction, 1.0)


def rows() -> list[SuiteRow]:
    out = []
    for i in range(4):
        out.append(row("kvevict", "full cache", 1.0, i, 1.0))
        out.append(row("kvevict", "full cache", 1.0, i, 0.0, task="hard"))  # the full cache fails it
        out.append(row("kvpress", "none", 1.0, i, 1.0))
        out.append(row("kvevict", "keydiff", 0.2, i, [1, 1, 0, 0][i]))
        out.append(row("kvevict", "caote+keydiff", 0.2, i, [1, 1, 1, 0][i]))
        out.append(row("kvevict", "tova", 0.2, i, 0.0))
        out.append(row("kvpress", "KeyDiffPress", 0.2, i, [1, 0, 0, 0][i]))
        out.append(row("kvpress", "TOVAPress", 0.2, i, 0.0))
        out.append(row("kvevict", "keydiff", 0.2, i, 1.0, task="hard"))  # out of every average
    return out


def test_cells_are_means_and_standard_errors_over_the_included_tasks_only() -> None:
    cells = protocol_cells(rows(), AGNOSTIC)
    cell = cells[("kvevict", "caote+keydiff", 0.2)]
    assert cell.n == 4 and cell.mean == 0.75
    assert math.isclose(cell.stderr, math.sqrt(0.25 / 4))  # sample variance 1/4 of [1, 1, 1, 0]
    assert cells[("kvevict", "keydiff", 0.2)].mean == 0.5  # the "hard" task's perfect rows stay out
    table = markdown_side_by_side(rows(), AGNOSTIC)
    assert "| kvevict | caote+keydiff | 75.0 ± 25.0 (n=4) |" in table


def test_best_of_each_system_is_paired_by_prompt_on_the_prompts_every_method_answered() -> None:
    table = markdown_best_of_each(rows(), AGNOSTIC)
    line = next(line for line in table.splitlines() if line.startswith("| 20% |"))
    assert "caote+keydiff: 75.0" in line and "KeyDiffPress: 25.0" in line
    # differences by prompt: [0, 1, 1, 0] -> mean 0.5, standard error sqrt(1/3 / 4)
    assert f"+50.0 ± {100 * math.sqrt(1 / 3 / 4):.1f} (n=4)" in line
    # A press measured on one prompt narrows the comparison to that prompt: every method is
    # compared on the prompts all of them answered, never a mean over 1 against a mean over 4.
    lucky = [row("kvpress", "LuckyPress", 0.2, 1, 1.0)]
    line = next(line for line in markdown_best_of_each(rows() + lucky, AGNOSTIC).splitlines()
                if line.startswith("| 20% |"))
    assert "LuckyPress: 100.0" in line and "keydiff: 100.0 |" in line and "+0.0 ± 0.0 (n=1)" in line


def test_wrapper_minus_base_counts_prompts_better_and_worse() -> None:
    table = markdown_paired_effects(rows(), AGNOSTIC)
    assert "| caote+keydiff - keydiff | +25.0 ± 25.0 (n=4; 1 better, 0 worse) |" in table


def test_allocator_minus_uniform_pairs_each_allocators_row_with_the_same_method_under_uniform() -> None:
    extra = [row("kvevict", name, 0.2, i, score[i]) for name, score in (
        ("keydiff (adahead)", [1, 1, 1, 1]), ("caote+keydiff (global) (reconstruct)", [1, 0, 0, 0]),
        ("caote+keydiff (reconstruct)", [0, 0, 0, 1]), ("tova (lukv)", [0, 1, 0, 0])) for i in range(4)]
    table = markdown_allocator_effects(rows() + extra, AGNOSTIC)
    # keydiff (adahead) - keydiff: [0, 0, 1, 1] -> +50 ± 28.9, the hard task's row left out
    assert f"| keydiff (adahead) - keydiff | +50.0 ± {100 * math.sqrt(1 / 3 / 4):.1f} (n=4; 2 better, 0 worse) |" in table
    assert "| caote+keydiff (global) (reconstruct) - caote+keydiff (reconstruct) | +0.0 ± " in table
    assert "(n=4; 1 better, 1 worse) |" in table
    assert "| tova (lukv) - tova | +25.0 ± 25.0 (n=4; 1 better, 0 worse) |" in table
    assert "caote+keydiff - " not in table  # a wrapper is no allocator


def test_the_rows_allocators_are_the_managers_but_uniform() -> None:
    from kvevict.cache_manager.budgets import SESSION_ALLOCATORS
    from kvevict.evaluation.suite_report import ROW_ALLOCATORS

    assert sorted(ROW_ALLOCATORS) == sorted(set(SESSION_ALLOCATORS) - {"uniform"})


def test_full_cache_agreement_names_the_prompts_that_differ() -> None:
    ours = [row("kvevict", "full cache", 1.0, i, 1.0, prediction=f"a{i}") for i in range(3)]
    theirs = [row("transformers", "full", 1.0, i, 1.0, prediction="a0" if i == 0 else f"b{i}",
                  protocol="one_shot") for i in range(3)]
    text = full_cache_agreement(ours + theirs)
    assert text.startswith("kvevict's full cache predicts exactly what transformers predicts on 1 of 3 prompts")
    assert text.endswith("differs on niah/1024/0001, niah/1024/0002")
    assert full_cache_agreement(ours) == ""


def test_the_full_cache_table_marks_the_tasks_left_out() -> None:
    table = markdown_full_cache(rows())
    assert "| hard | 0.0 ± 0.0 (n=4) * |" in table and "| niah | 100.0 ± 0.0 (n=4) |" in table


def test_tables_average_the_prompts_every_configuration_answered() -> None:
    extra = [row("kvpress", "TOVAPress", 0.2, 9, 1.0), row("kvevict", "full cache", 1.0, 9, 1.0)]
    kept = common_prompts(rows() + extra)
    # prompt 9 lacks most configurations, the "hard" prompts every kvpress one
    assert {r.id for r in kept} == {f"niah/1024/{i:04d}" for i in range(4)}
    assert protocol_cells(kept, AGNOSTIC)[("kvpress", "TOVAPress", 0.2)].n == 4
