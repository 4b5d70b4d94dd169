"""benchmarks/kept_overlap.py's arithmetic on hand-made keep masks: the share of the peer's kept
tokens kept too, per head, and whether the peer keeps one token set per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.script_loader import load_script

overlap_script = load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "kept_overlap.py")


def test_overlap_is_the_share_of_their_kept_tokens_we_keep_averaged_over_heads() -> None:
    theirs = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    ours = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
    assert overlap_script.overlap(ours, theirs) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="different tokens"):
        overlap_script.overlap(ours[:, :3], theirs)


def test_the_table_reports_means_lowest_prompts_and_one_set_per_layer() -> None:
    same = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    theirs = {f"P|p{i}|0.5|0": same for i in range(2)}
    ours = {"a|p0|0.5|0": same, "a|p1|0.5|0": np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)}
    table = overlap_script.overlap_table(ours, theirs, [("a", "P")], [0.5])
    # p0: 100%, p1: (50% + 0%) / 2 = 25%; mean 62.5%, lowest prompt 25%; P keeps one set per layer.
    assert "| a | P (yes) | 62.5% (lowest prompt 25.0%) |" in table
