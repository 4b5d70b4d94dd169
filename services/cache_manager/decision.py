"""One report's decision: append the new tokens, update accumulators, score, allocate budgets,
select, and compact the state. Pure: returns the answer and the next state, stores nothing."""

from __future__ import annotations

import numpy as np

from kvevict import wire
from kvevict.cache_manager.policies.base import LayerContext
from kvevict.cache_manager.selection import select_keep
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.validation import ValidatedReport
from kvevict.v1 import cache_manager_pb2 as pb


def decide(state: SessionState, report: ValidatedReport, sequence: int) -> tuple[pb.ReportBlockResponse, SessionState]:
    """Decides a validated report; the next state's `last_response` is the answer serialized."""
    settings = state.settings
    policy = settings.policy()
    allocator = settings.allocator()
    heads = settings.geometry.num_kv_heads
    # Every KV head caches the new tokens at the end of its row.
    new_positions = np.broadcast_to(report.positions.astype(np.int32), (heads, report.positions.size))

    contexts = []
    for layer, statistics in enumerate(report.statistics):
        accumulator = policy.accumulate(state.accumulators[layer], statistics) if policy.accumulates else None
        positions = np.concatenate([state.positions[layer], new_positions], axis=1)
        contexts.append(LayerContext(layer, sequence, positions, statistics, accumulator))
    lengths = [ctx.positions.shape[1] for ctx in contexts]
    scores = [policy.score(ctx) for ctx in contexts] if allocator.needs_scores else None
    budgets = allocator.allocate(state.layer_budgets, lengths, scores)

    response = pb.ReportBlockResponse(sequence=sequence, layer_budgets=budgets)
    kept_positions, kept_accumulators = [], []
    evicted = 0
    for layer, ctx in enumerate(contexts):
        length, budget = lengths[layer], budgets[layer]
        positions, accumulator = ctx.positions, ctx.accumulator
        if length > budget:
            score = scores[layer] if scores is not None else policy.score(ctx)
            assert score.shape == positions.shape, f"{policy.name} scored {score.shape}, cache is {positions.shape}"
            keep = select_keep(score, budget, settings.sink, settings.recent)
            # Exactly `budget` per row, so row-major boolean indexing keeps each head's order.
            positions = positions[keep].reshape(heads, budget)
            if accumulator is not None:
                accumulator = accumulator[keep].reshape(heads, budget)
            response.keeps.add(layer=layer, cache_length=length, kept_tokens=budget, keep=wire.encode_bits(keep))
            evicted += (length - budget) * heads
        kept_positions.append(positions)
        if accumulator is not None:
            kept_accumulators.append(accumulator)
    response.evicted_tokens = evicted

    next_state = state.evolve(
        layer_budgets=tuple(budgets),
        positions=kept_positions,
        accumulators=kept_accumulators,
        last_sequence=sequence,
        last_position=int(report.positions[-1]),
        last_response=response.SerializeToString(),
        reports=state.reports + 1,
        evicted_tokens=state.evicted_tokens + evicted,
    )
    return response, next_state
