"""CAOTE is the exact output change of evicting one token, on a real model's attention.

Exact cases (relative error < 1e-4, statistics in float32, brute force in float64):
* one query of one query head (TOVA, window 1, MHA so no group averaging);
* a window of queries, for the virtual query whose attention is the window's mean attention.
Approximations are measured (Spearman rank correlation with brute force) and shown to differ:
the mean of each window query's own change, the GQA group mean, and FastCAOTE.
"""

from __future__ import annotations

import numpy as np

from tests.caote_oracle import (caote_from_report, max_relative_error, output_change_without_each,
                                query_probs, rank_correlation, run_block)
from tests.tiny_models import tiny_config

TOKENS = 48
# A wide initialisation gives peaked attention, where the approximations can be told apart.
PEAKED = dict(initializer_range=0.25)
MHA = dict(num_attention_heads=4, num_key_value_heads=4, **PEAKED)


def test_caote_equals_output_change_of_a_single_query_exactly():
    recorder, captured = run_block(tiny_config("llama", **MHA), window=1, tokens=TOKENS)
    worst = 0.0
    for layer, att in enumerate(captured):
        for head in range(att.key.shape[0]):
            probs = query_probs(att, head, slice(TOKENS - 1, TOKENS))[0]
            brute = output_change_without_each(probs, att.value[head])
            worst = max(worst, max_relative_error(caote_from_report(recorder, layer, head), brute))
    print(f"single query: max relative error of CAOTE vs brute force = {worst:.2e}")
    assert worst < 1e-4


def test_caote_over_a_window_equals_the_virtual_query_change_not_the_mean_change():
    window = 8
    recorder, captured = run_block(tiny_config("qwen2", **MHA), window=window, tokens=TOKENS)
    worst, mean_change_gap, correlations = 0.0, 0.0, []
    for layer, att in enumerate(captured):
        for head in range(att.key.shape[0]):
            probs = query_probs(att, head, slice(TOKENS - window, TOKENS))
            virtual = output_change_without_each(probs.mean(axis=0), att.value[head])
            got = caote_from_report(recorder, layer, head)
            worst = max(worst, max_relative_error(got, virtual))
            per_query = np.mean([output_change_without_each(p, att.value[head]) for p in probs], axis=0)
            mean_change_gap = max(mean_change_gap, max_relative_error(got, per_query))
            correlations.append(rank_correlation(got, per_query))
    print(f"window {window}: CAOTE vs virtual-query change max rel error {worst:.2e}; vs mean of per-query "
          f"changes max rel gap {mean_change_gap:.2f}, Spearman median {np.median(correlations):.3f}")
    assert worst < 1e-4
    assert mean_change_gap > 1e-2  # a different quantity, only approximated
    assert np.median(correlations) > 0


def test_gqa_group_mean_and_fastcaote_are_approximations():
    recorder, captured = run_block(tiny_config("mistral", **PEAKED), window=1, tokens=TOKENS)  # 4 query / 2 KV heads
    group_gap, group_corr, fast_corr = 0.0, [], []
    for layer, att in enumerate(captured):
        group = att.query.shape[0] // att.key.shape[0]
        for kv_head in range(att.key.shape[0]):
            # Evicting token j removes it for every query head of the group; the heads' outputs are
            # concatenated before o_proj, so the true change is the norm over the group.
            per_head = [output_change_without_each(query_probs(att, h, slice(TOKENS - 1, TOKENS))[0],
                                                   att.value[kv_head])
                        for h in range(kv_head * group, (kv_head + 1) * group)]
            truth = np.sqrt(np.sum(np.square(per_head), axis=0))
            got = caote_from_report(recorder, layer, kv_head)
            group_gap = max(group_gap, max_relative_error(got, truth / np.sqrt(group)))
            group_corr.append(rank_correlation(got, truth))
            fast_corr.append(rank_correlation(caote_from_report(recorder, layer, kv_head, fast=True), got))
    print(f"GQA group mean vs true group change: Spearman median {np.median(group_corr):.3f}; "
          f"FastCAOTE vs CAOTE: Spearman median {np.median(fast_corr):.3f}")
    assert group_gap > 1e-3  # the group mean is not exact
    assert np.median(group_corr) > 0
    assert np.median(fast_corr) > 0
