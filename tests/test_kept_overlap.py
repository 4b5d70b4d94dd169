"""benchmarks/kept_overlap.py's arithmetic on hand-made keep masks: the share of the peer's kept
tokens kept too, over every head, whether the peer keeps one token set per layer, and per-head
answers read back as (heads, tokens) masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.script_loader import load_script

overlap_script = load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "kept_overlap.py")


def test_overlap_is_the_share_of_their_kept_tokens_we_keep_over_every_head() -> None:
    theirs = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    ours = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
    assert overlap_script.overlap(ours, theirs) == pytest.approx((0.5 + 1.0) / 2)  # equal budgets: the heads' mean
    # Per-head budgets (KVzip): 3 of their 4 kept tokens, whatever each head holds.
    theirs = np.array([[1, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    ours = np.array([[1, 1, 0, 1], [0, 0, 0, 1]], dtype=bool)
    assert overlap_script.overlap(ours, theirs) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="different tokens"):
        overlap_script.overlap(ours[:, :3], theirs)


def test_the_table_reports_means_lowest_prompts_and_one_set_per_layer() -> None:
    same = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=bool)
    theirs = {f"P|p{i}|0.5|0": same for i in range(2)}
    ours = {"a|p0|0.5|0": same, "a|p1|0.5|0": np.array([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=bool)}
    table = overlap_script.overlap_table(ours, theirs, [("a", "P")], [0.5])
    # p0: 100%, p1: (50% + 0%) / 2 = 25%; mean 62.5%, lowest prompt 25%; P keeps one set per layer.
    assert "| a | P (yes) | 62.5% (lowest prompt 25.0%) |" in table


def test_the_table_pools_a_prompts_layers_by_what_they_keep() -> None:
    # Layer 0 keeps 1 token (we have it), layer 1 keeps 3 (we have 1): 2 of 4, not (100% + 33%) / 2.
    theirs = {"P|p0|0.1|0": np.array([[1, 0, 0, 0]], dtype=bool), "P|p0|0.1|1": np.array([[1, 1, 1, 0]], dtype=bool)}
    ours = {"a|p0|0.1|0": np.array([[1, 0, 0, 0]], dtype=bool), "a|p0|0.1|1": np.array([[1, 0, 0, 1]], dtype=bool)}
    assert "| a | P (yes) | 50.0% (lowest prompt 50.0%) |" in overlap_script.overlap_table(ours, theirs, [("a", "P")], [0.1])


def test_a_per_head_answer_reads_back_as_each_heads_mask() -> None:
    from kvevict import wire
    from kvevict.v1 import cache_manager_pb2 as pb

    heads = np.array([[1, 0, 1], [0, 0, 1]], dtype=bool)
    keep = pb.LayerKeep(layer=0, cache_length=6, kept_tokens=3, head_lengths=[3, 3], head_kept=[2, 1],
                        keep=wire.encode_bits(heads.ravel()))
    assert (overlap_script.layer_mask(keep) == heads).all()
    ragged = pb.LayerKeep(layer=1, cache_length=5, kept_tokens=3, head_lengths=[3, 2], head_kept=[2, 1],
                          keep=wire.encode_bits(np.ones(5, dtype=bool)))
    with pytest.raises(RuntimeError, match="not one context"):
        overlap_script.layer_mask(ragged)
