"""One report's decision in a per-head session (allocators adahead, global, lukv): every KV head
of a layer holds its own number of tokens, so the cache is ragged.

Each head is scored by the session's policy exactly as a one-KV-head layer holding the head's
own tokens would be (its positions, its statistics row, its accumulator row: a LayerContext of
(1, length) arrays, the per-layer scoring path of kvevict.cache_manager.decision). The allocator
then gives every (layer, head) a budget (kvevict.cache_manager.head_budgets: adahead and global
from the scores, lukv from the profile's curves and the heads' lengths) and each head keeps its
protected tokens (its own first `sink` and last `recent`) plus its best others up to its budget.

The allocators never give a head more than it holds, so a head's budget after a decision is both
the allocator's budget for the (layer, head) and the tokens the head keeps: head_budgets report
that number. Pure like decision.decide: returns the answer, the next state and DecisionStats.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvevict import wire
from kvevict.cache_manager import head_budgets
from kvevict.cache_manager.decision import DecisionStats
from kvevict.cache_manager.policies.base import LayerContext
from kvevict.cache_manager.settings import SessionSettings
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.validation import PerHeadReport
from kvevict.cache_manager.wrappers import CAOTE
from kvevict.v1 import cache_manager_pb2 as pb


def initial_head_budgets(settings: SessionSettings) -> list[int]:
    """Budgets announced at OpenSession: `tokens` for every (layer, head), row-major."""
    geometry = settings.geometry
    return [settings.budget_tokens] * (geometry.num_layers * geometry.num_kv_heads)


def layer_totals(budgets: np.ndarray | Sequence[int], heads: int) -> list[int]:
    """Per-layer totals over the heads of row-major (layer, head) counts."""
    return np.asarray(budgets, dtype=np.int64).reshape(-1, heads).sum(axis=1).tolist()


def allocate(settings: SessionSettings, lengths: np.ndarray, rows: Sequence[Sequence[np.ndarray]] | None) -> np.ndarray:
    """The session allocator's budgets (layers, heads) for heads holding `lengths` (layers, heads)
    tokens; `rows[l][h]` the heads' scores (adahead and global decide from them)."""
    name, tokens, alpha = settings.allocator_name, settings.budget_tokens, settings.floor
    sink, recent = settings.sink, settings.recent
    if name == "adahead":
        return head_budgets.adahead_budgets_ragged(rows, tokens, sink, recent, alpha)
    if name == "global":
        return head_budgets.global_budgets_ragged(rows, tokens, sink, recent, alpha)
    assert name == "lukv", f"{name} is no per-head allocator"
    return head_budgets.lukv_budgets(settings.curves, np.asarray(settings.profile_grid), tokens, lengths, sink,
                                     recent, alpha, hull=settings.hull)


def decide_per_head(state: SessionState, report: PerHeadReport,
                    sequence: int) -> tuple[pb.ReportBlockResponse, SessionState, DecisionStats]:
    """Decides a validated report of a per-head session; the next state's `last_response` is
    the answer serialized."""
    settings = state.settings
    policy = settings.policy()
    heads = settings.geometry.num_kv_heads
    layers = settings.geometry.num_layers
    lengths = report.head_lengths
    new_positions = report.positions.astype(np.int32)[None, :]

    contexts: list[LayerContext] = []
    for layer in range(layers):
        starts = np.concatenate([[0], np.cumsum(lengths[layer])])
        for head in range(heads):
            entry = layer * heads + head
            statistics = {req: values[layer][starts[head]:starts[head + 1]][None, :]
                          for req, values in report.values.items()}
            accumulator = policy.accumulate(state.accumulators[entry], statistics) if policy.accumulates else None
            positions = np.concatenate([state.positions[entry], new_positions], axis=1)
            contexts.append(LayerContext(layer, sequence, positions, statistics, accumulator))

    scores: dict[int, np.ndarray] = {}

    def score(entry: int) -> np.ndarray:
        """The policy's score of one head, alone: a one-KV-head layer's (1, length) row."""
        if entry not in scores:
            row = policy.score(contexts[entry])
            assert row.shape == contexts[entry].positions.shape, f"{policy.name} scored {row.shape}"
            scores[entry] = row[0]
        return scores[entry]

    needs_scores = head_budgets.HEAD_ALLOCATORS[settings.allocator_name].needs_scores
    rows = ([[score(layer * heads + head) for head in range(heads)] for layer in range(layers)]
            if needs_scores else None)
    budgets = allocate(settings, lengths, rows)
    kept = np.minimum(budgets, lengths)

    response = pb.ReportBlockResponse(sequence=sequence)
    kept_positions, kept_accumulators, evicted_scores = [], [], []
    for layer in range(layers):
        masks = []
        for head in range(heads):
            entry = layer * heads + head
            ctx = contexts[entry]
            if kept[layer, head] >= lengths[layer, head]:
                mask = None
            else:
                row = score(entry)
                mask = head_budgets.keep_masks_ragged([[row]], budgets[layer:layer + 1, head:head + 1],
                                                      settings.sink, settings.recent)[0][0]
                if isinstance(policy, CAOTE):
                    evicted_scores.append(np.asarray(row[~mask], dtype=np.float64))
            masks.append(mask)
            kept_positions.append(ctx.positions if mask is None else ctx.positions[:, mask])
            if ctx.accumulator is not None:
                kept_accumulators.append(ctx.accumulator if mask is None else ctx.accumulator[:, mask])
        if any(mask is not None for mask in masks):
            _add_keep(response, layer, lengths[layer], kept[layer], masks)
    response.layer_budgets[:] = layer_totals(budgets, heads)
    response.head_budgets[:] = budgets.ravel().tolist()
    evicted = int((lengths - kept).sum())
    response.evicted_tokens = evicted

    next_state = state.evolve(
        layer_budgets=tuple(response.layer_budgets),
        head_budgets=tuple(response.head_budgets),
        positions=kept_positions,
        accumulators=kept_accumulators if policy.accumulates else (),
        last_sequence=sequence,
        last_position=int(report.positions[-1]),
        last_response=response.SerializeToString(),
        reports=state.reports + 1,
        evicted_tokens=state.evicted_tokens + evicted,
    )
    errors = (lambda: (np.concatenate(evicted_scores),)) if evicted_scores else None
    stats = DecisionStats(
        num_kv_heads=heads, cache_lengths=tuple(lengths.sum(axis=1).tolist()),
        layer_budgets=tuple((budgets.sum(axis=1) / heads).tolist()), evicted_errors=errors,
        head_lengths=lengths, head_kept=kept, head_budget_ratios=budgets.ravel() / settings.budget_tokens)
    return response, next_state, stats


def _add_keep(response: pb.ReportBlockResponse, layer: int, lengths: np.ndarray, kept: np.ndarray,
              masks: list[np.ndarray | None]) -> None:
    """One layer's LayerKeep: every head's mask (None: keeps all), head after head."""
    full = [np.ones(int(n), dtype=bool) if mask is None else mask for mask, n in zip(masks, lengths)]
    keep = response.keeps.add(layer=layer, cache_length=int(lengths.sum()), kept_tokens=int(kept.sum()),
                              head_lengths=lengths.tolist(), head_kept=kept.tolist())
    keep.keep.CopyFrom(wire.encode_bits(np.concatenate(full)))

