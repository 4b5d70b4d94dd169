"""One report's decision: append the new tokens, drop what left a sliding window, update
accumulators, score, allocate budgets, select, and compact the state. Pure: returns the answer,
the next state and what the decision did (for the metrics), stores nothing.

Sessions without sliding-window layers take the batched path: every layer at once, flat in the
report's Layout (kvevict.cache_manager.batch), so each step is a few numpy calls over the whole
model instead of a few per layer; it decides exactly as the per-layer path, which sliding-window
sessions keep (tests/test_manager_fast_path.py holds both to the path as it was before). Where
the policy has a kernel source (Wrapper.kernel_scoring: h2o, snapkv, tova, valuenorm, bare or
under CAOTE) and the compiled kernels are on, the fused decision takes its place: one compiled
pass per layer from the wire's bytes (kvevict.cache_manager.kernels), the same answer.

Sliding-window layers: the tokens no later query can see in any head were dropped before the
report (validation counted them; the worker dropped them too). What is left unseen is a head's
share of its layer's leading columns that other heads still see: those score below every token a
query can still see, so budgets go to visible tokens first, and the protected sinks are the
real ones still cached (none once the window has passed them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from kvevict import wire
from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import Layout, LayerStack, flat_layers
from kvevict.cache_manager.policies.base import LayerContext, ReportBatch
from kvevict.cache_manager.selection import Ranking, select_keep, select_keep_flat, select_keep_scored
from kvevict.cache_manager.sliding import hidden
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.validation import ValidatedReport
from kvevict.cache_manager.wrappers import CAOTE, caote_ranking
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2


@dataclass(frozen=True)
class DecisionStats:
    """What one decision did, in tokens per (layer, KV head, token) cache entry."""

    num_kv_heads: int
    cache_lengths: tuple[int, ...]  # per layer: tokens per KV head decided on (new tokens included)
    layer_budgets: tuple[int, ...]  # per layer, after the decision
    # Computes `evicted_output_errors` when first asked (the metrics ask; an embedded manager
    # does not, so the decision does not gather them).
    evicted_errors: Callable[[], tuple[np.ndarray, ...]] | None = field(default=None, repr=False, compare=False)
    seconds: float = 0.0  # validation + decision (set by the report step)
    # Per-head sessions (kvevict.cache_manager.per_head): tokens decided on and kept per (layer,
    # KV head), (layers, heads), and every head's budget / BudgetSpec.tokens, row-major. There,
    # cache_lengths are the layers' totals over heads and layer_budgets the mean per KV head.
    head_lengths: np.ndarray | None = field(default=None, repr=False, compare=False)
    head_kept: np.ndarray | None = field(default=None, repr=False, compare=False)
    head_budget_ratios: np.ndarray | None = field(default=None, repr=False, compare=False)

    @cached_property
    def evicted_output_errors(self) -> tuple[np.ndarray, ...]:
        """CAOTE-wrapped policies only (caote, fastcaote): per layer that evicted, the
        output-error scores of the evicted tokens (kv_heads, evicted per head), each head's in no
        particular order (per-head sessions: one 1-D array of them all); empty for other policies."""
        return () if self.evicted_errors is None else tuple(self.evicted_errors())

    @property
    def evaluated_per_layer(self) -> np.ndarray:
        if self.head_lengths is not None:
            return self.head_lengths.sum(axis=1)
        return np.asarray(self.cache_lengths, dtype=np.int64) * self.num_kv_heads

    @property
    def kept_per_layer(self) -> np.ndarray:
        if self.head_kept is not None:
            return self.head_kept.sum(axis=1)
        lengths = np.asarray(self.cache_lengths, dtype=np.int64)
        return np.minimum(lengths, np.asarray(self.layer_budgets, dtype=np.int64)) * self.num_kv_heads

    @property
    def evicted_per_layer(self) -> np.ndarray:
        return self.evaluated_per_layer - self.kept_per_layer


def decide(state: SessionState, report: ValidatedReport,
           sequence: int) -> tuple[pb.ReportBlockResponse, SessionState, DecisionStats]:
    """Decides a validated report; the next state's `last_response` is the answer serialized."""
    if any(state.settings.geometry.sliding_windows):
        return _decide_layers(state, report, sequence)
    policy = state.settings.policy()
    scoring = policy.kernel_scoring() if report.raw is not None else None
    if scoring is not None:
        return _decide_fused(state, report, sequence, scoring)
    return _decide_batched(state, report, sequence)


def _decide_fused(state: SessionState, report: ValidatedReport, sequence: int,
                  scoring: kernels.Scoring) -> tuple[pb.ReportBlockResponse, SessionState, DecisionStats]:
    """decide() in the compiled kernels, from the wire's raw statistics: kernels.fused, one pass
    per layer, once the budgets are known (for score-dependent ones, after kernels.totals gave
    the allocator its estimates, in a pass that keeps rows and keys in cache). A layer the
    kernels leave to the exact scores (and the metrics' evicted errors) gets the policy's
    float64 scores from the kernels' score rows (Wrapper.score_rows), then select_keep and the
    compaction."""
    settings = state.settings
    policy = settings.policy()
    allocator = settings.allocator()
    layout: Layout = report.layout
    heads = layout.heads
    lengths = list(layout.lengths)
    score_requirement, deviation_requirement = policy.kernel_statistics()
    score = report.raw[score_requirement]
    deviation = report.raw[deviation_requirement] if deviation_requirement is not None else None
    tracked = np.asarray(state.cache_lengths, np.intp)
    previous_positions = flat_layers(state.positions, np.int32)
    previous_accumulators = flat_layers(state.accumulators, np.float32) if policy.accumulates else None
    new_positions = report.positions.astype(np.int32)
    sink, recent = settings.sink, settings.recent

    def layer_rows(layer: int) -> np.ndarray:
        """Layer `layer`'s (heads, n) score rows: the base's score (its accumulators for H2O)."""
        alone = kernels.prepare(scoring, score, deviation, heads, layout.lengths_array, tracked, previous_accumulators,
                                range(layer, layer + 1))[0]
        return alone.reshape(heads, lengths[layer])

    def layer_deviation(layer: int) -> np.ndarray | None:
        return deviation.layer(layer).reshape(heads, lengths[layer]) if deviation is not None else None

    def exact(layer: int) -> np.ndarray:
        """The policy's score of the layer (Wrapper.score_rows of the base's score rows)."""
        return policy.score_rows(layer_rows(layer), layer_deviation(layer))

    def exact_totals(layers: np.ndarray, columns: np.ndarray, sink: int, recent: int) -> np.ndarray:
        """Exact scores summed over heads at a few middle columns (wrappers.caote_totals), compiled."""
        return kernels.exact_totals(scoring, score, deviation, heads, layout.lengths_array, tracked,
                                    previous_accumulators, layers, sink + columns)

    if allocator.needs_scores:
        assert scoring.keys == kernels.KEYS_CAOTE, "score-dependent budgets need output-error keys"
        sums, spread, totals = kernels.totals(scoring, score, deviation, heads, layout.lengths_array, tracked,
                                              previous_accumulators, sink, recent)
        ranking = caote_ranking(layout, exact, None, sums, spread, totals=(totals, sink, recent))
        ranking.exact_totals = exact_totals
        budgets = allocator.allocate_flat(state.layer_budgets, lengths, ranking)
    else:
        ranking = Ranking(layout, exact)
        budgets = allocator.allocate_flat(state.layer_budgets, lengths, None)
    # After kernels.totals' pass in layer order, backwards: the last layers' data may still be cached.
    decided = kernels.fused(scoring, score, deviation, heads, layout.lengths_array, np.asarray(budgets, np.intp),
                            new_positions, tracked, previous_positions, previous_accumulators, sink, recent,
                            backwards=allocator.needs_scores)
    for layer in np.flatnonzero(decided.status).tolist():
        keep = select_keep(ranking.exact_layer(layer), budgets[layer], sink, recent)
        decided.compact_layer(layer, keep, state.positions[layer], new_positions,
                              layer_rows(layer) if policy.accumulates else None)

    response = pb.ReportBlockResponse(sequence=sequence, layer_budgets=budgets)
    evicting_layers = [layer for layer, (n, b) in enumerate(zip(lengths, budgets)) if n > b]
    packed_at = decided.packed_offsets
    for layer in evicting_layers:
        _add_keep(response, layout, layer, budgets[layer], decided.packed[packed_at[layer]:packed_at[layer + 1]].tobytes())
    evicted = sum((lengths[layer] - budgets[layer]) * heads for layer in evicting_layers)
    response.evicted_tokens = evicted
    kept = Layout(heads, tuple(decided.kept.tolist()))
    next_state = state.evolve(
        layer_budgets=tuple(budgets),
        positions=LayerStack.of(_frozen(decided.positions), kept),
        accumulators=LayerStack.of(_frozen(decided.accumulators), kept) if policy.accumulates else (),
        last_sequence=sequence,
        last_position=int(report.positions[-1]),
        last_response=response.SerializeToString(),
        reports=state.reports + 1,
        evicted_tokens=state.evicted_tokens + evicted,
    )
    errors = None
    if isinstance(policy, CAOTE):
        def errors() -> tuple[np.ndarray, ...]:
            def kept_mask(layer: int) -> np.ndarray:
                packed = decided.packed[packed_at[layer]:packed_at[layer + 1]].reshape(heads, -1)
                return np.unpackbits(packed, axis=-1, count=lengths[layer], bitorder="little").astype(bool)
            return tuple(ranking.exact_layer(layer)[~kept_mask(layer)].reshape(heads, -1) for layer in evicting_layers)
    stats = DecisionStats(num_kv_heads=heads, cache_lengths=tuple(lengths), layer_budgets=tuple(budgets),
                          evicted_errors=errors)
    return response, next_state, stats


def _decide_batched(state: SessionState, report: ValidatedReport,
                    sequence: int) -> tuple[pb.ReportBlockResponse, SessionState, DecisionStats]:
    """decide() for sessions without sliding-window layers, every layer at once."""
    settings = state.settings
    policy = settings.policy()
    allocator = settings.allocator()
    layout: Layout = report.layout
    heads = layout.heads
    lengths = list(layout.lengths)
    new_positions = report.positions.astype(np.int32)

    accumulator = (policy.base.accumulate_flat(state.accumulators, report.values, layout)
                   if policy.accumulates else None)
    batch = ReportBatch(layout, sequence, state.positions, new_positions, report.values, accumulator)
    evicting = any(n > b for n, b in zip(lengths, state.layer_budgets))
    ranking = policy.rank_flat(batch, ordered=report.bulk) if allocator.needs_scores or evicting else None
    budgets = allocator.allocate_flat(state.layer_budgets, lengths, ranking)

    response = pb.ReportBlockResponse(sequence=sequence, layer_budgets=budgets)
    evicting_layers = [layer for layer, (n, b) in enumerate(zip(lengths, budgets)) if n > b]
    kept = Layout(heads, tuple(min(n, b) for n, b in zip(lengths, budgets)))
    keep = None
    if evicting_layers:
        assert ranking is not None
        keep = select_keep_flat(ranking, budgets, settings.sink, settings.recent)
    if kernels.enabled:
        # One pass per row: the kept positions and accumulators, and the packed masks.
        positions, accumulators, packed, packed_at = kernels.compact(
            keep if keep is not None else np.ones(1, bool), layout.offsets_array, layout.lengths_array, heads,
            kept.lengths_array, layout.lengths_array > kept.lengths_array, flat_layers(state.positions, np.int32),
            np.asarray(state.cache_lengths, np.intp), new_positions, accumulator)
        for layer in evicting_layers:
            _add_keep(response, layout, layer, budgets[layer], packed[packed_at[layer]:packed_at[layer + 1]].tobytes())
    else:
        positions = batch.positions
        accumulators = accumulator
        if keep is not None:
            _add_keeps(response, layout, keep, budgets, evicting_layers)
            # Row-major boolean gathers keep each head's order.
            positions = positions[keep]
            accumulators = accumulator[keep] if accumulator is not None else None
    kept_positions = LayerStack.of(positions, kept)
    kept_accumulators = LayerStack.of(accumulators, kept) if accumulator is not None else ()
    evicted = sum((lengths[layer] - budgets[layer]) * heads for layer in evicting_layers)
    response.evicted_tokens = evicted

    next_state = _next_state(state, report, sequence, response, budgets, kept_positions, kept_accumulators, evicted)
    errors = None
    if isinstance(policy, CAOTE):
        def errors() -> tuple[np.ndarray, ...]:
            return tuple(ranking.exact_layer(layer)[~layout.layer(keep, layer)].reshape(heads, -1)
                         for layer in evicting_layers)
    stats = DecisionStats(num_kv_heads=heads, cache_lengths=tuple(lengths), layer_budgets=tuple(budgets),
                          evicted_errors=errors)
    return response, next_state, stats


def _frozen(flat: np.ndarray) -> np.ndarray:
    """A new state's buffer made read-only before its layer views are taken (they inherit it)."""
    flat.flags.writeable = False
    return flat


def _add_keep(response: pb.ReportBlockResponse, layout: Layout, layer: int, budget: int, packed: bytes) -> None:
    """One evicting layer's bit-packed keep mask (set in place: no Tensor built and copied)."""
    length = layout.lengths[layer]
    keep = response.keeps.add(layer=layer, cache_length=length, kept_tokens=budget).keep
    keep.dtype = tensor_pb2.DTYPE_PACKED_BITS
    keep.shape[:] = (layout.heads, length)
    keep.data = packed


def _add_keeps(response: pb.ReportBlockResponse, layout: Layout, keep: np.ndarray, budgets: list[int],
               evicting_layers: list[int]) -> None:
    """The evicting layers' keep masks, bit-packed (one packbits per group of one shape)."""
    evicting = set(evicting_layers)
    marks = [layer in evicting for layer in range(len(layout.lengths))]
    for start, stop, rows in layout.grouped_rows(keep, marks):
        if not marks[start]:
            continue
        length = layout.lengths[start]
        packed = np.packbits(rows, axis=-1, bitorder="little").reshape(stop - start, -1)
        for layer in range(start, stop):
            _add_keep(response, layout, layer, budgets[layer], packed[layer - start].tobytes())


def _decide_layers(state: SessionState, report: ValidatedReport,
                   sequence: int) -> tuple[pb.ReportBlockResponse, SessionState, DecisionStats]:
    """decide() layer by layer (sessions with sliding-window layers)."""
    settings = state.settings
    policy = settings.policy()
    allocator = settings.allocator()
    heads = settings.geometry.num_kv_heads
    # Every KV head caches the new tokens at the end of its row.
    new_positions = np.broadcast_to(report.positions.astype(np.int32), (heads, report.positions.size))
    windows = settings.geometry.sliding_windows
    last_position = int(report.positions[-1])

    contexts, unseen = [], []
    for layer, statistics in enumerate(report.statistics):
        dropped = report.dropped[layer] if report.dropped else 0
        previous = state.accumulators[layer][:, dropped:] if policy.accumulates else None
        accumulator = policy.accumulate(previous, statistics) if policy.accumulates else None
        positions = np.concatenate([state.positions[layer], new_positions], axis=1)[:, dropped:]
        contexts.append(LayerContext(layer, sequence, positions, statistics, accumulator))
        mask = hidden(positions, last_position, windows[layer]) if windows[layer] else None
        unseen.append(mask if mask is not None and mask.any() else None)
    lengths = [ctx.positions.shape[1] for ctx in contexts]
    scores = [policy.score(ctx) for ctx in contexts] if allocator.needs_scores else None
    # A token no query can see is worth nothing to a layer's budget (evicting it changes no output).
    ranked = None if scores is None else [_scored_unseen(score, mask, 0.0) for score, mask in zip(scores, unseen)]
    budgets = allocator.allocate(state.layer_budgets, lengths, ranked)

    response = pb.ReportBlockResponse(sequence=sequence, layer_budgets=budgets)
    kept_positions, kept_accumulators = [], []
    evicted = 0
    output_errors = isinstance(policy, CAOTE)
    evicted_errors = []
    for layer, ctx in enumerate(contexts):
        length, budget = lengths[layer], budgets[layer]
        positions, accumulator = ctx.positions, ctx.accumulator
        if length > budget:
            score = _scored_unseen(scores[layer] if scores is not None else policy.score(ctx), unseen[layer], -np.inf)
            assert score.shape == positions.shape, f"{policy.name} scored {score.shape}, cache is {positions.shape}"
            sink = _sinks_cached(positions, settings.sink) if windows[layer] else settings.sink
            keep, evicted_scores = select_keep_scored(score, budget, sink, settings.recent)
            if output_errors:
                # Evicting a token no query can see changes no output: its error is 0.
                evicted_errors.append(np.where(np.isneginf(evicted_scores), 0.0, evicted_scores)
                                      if unseen[layer] is not None else evicted_scores)
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

    next_state = _next_state(state, report, sequence, response, budgets, kept_positions, kept_accumulators, evicted)
    stats = DecisionStats(num_kv_heads=heads, cache_lengths=tuple(lengths), layer_budgets=tuple(budgets),
                          evicted_errors=lambda: tuple(evicted_errors))
    return response, next_state, stats


def _next_state(state: SessionState, report: ValidatedReport, sequence: int, response: pb.ReportBlockResponse,
                budgets, positions, accumulators, evicted: int) -> SessionState:
    """The state after a decision (either path): what is kept, and the answer to replay."""
    return state.evolve(
        layer_budgets=tuple(budgets),
        positions=positions,
        accumulators=accumulators,
        last_sequence=sequence,
        last_position=int(report.positions[-1]),
        last_response=response.SerializeToString(),
        reports=state.reports + 1,
        evicted_tokens=state.evicted_tokens + evicted,
    )


def _scored_unseen(score: np.ndarray, unseen: np.ndarray | None, value: float) -> np.ndarray:
    """`score` with `value` for the tokens no query can see any more (True in `unseen`)."""
    return score if unseen is None else np.where(unseen, np.float32(value), score)


def _sinks_cached(positions: np.ndarray, sink: int) -> int:
    """How many of the `sink` first positions a sliding layer still caches: protected sinks lead
    every head's row (the same in each) until the window passes them and they are dropped."""
    return int(np.count_nonzero(positions[0, :sink] < sink))
