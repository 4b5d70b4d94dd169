"""The manager's per-layer decision path as it was before the batched fast path: the reference
tests/test_manager_fast_path.py holds the product to, decision for decision.

`reference_report(request, state)` validates and decides one report exactly as the manager did
then: every statistic decoded with numpy's float16 cast and checked per layer and tensor, every
layer scored, allocated, selected and compacted on its own (boolean masks), CAOTE in float64.
It uses the library's per-layer building blocks (each policy's `score`, `caote_scores`,
`select_keep_scored`, `Adaptive.allocate`), which the other manager tests prove against brute
force; only the batching around them is new in the product.
"""

from __future__ import annotations

import numpy as np

from kvevict import wire
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.policies.base import LayerContext
from kvevict.cache_manager.selection import select_keep_scored
from kvevict.cache_manager.sliding import droppable, hidden
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.cache_manager.wrappers import CAOTE
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

MAX_POSITION = np.iinfo(np.int32).max
PHASES = (pb.PHASE_PREFILL, pb.PHASE_DECODE)


def reference_report(request: pb.ReportBlockRequest, state: SessionState
                     ) -> tuple[pb.ReportBlockResponse, SessionState, tuple[np.ndarray, ...]]:
    """(answer, next state, evicted CAOTE errors per evicting layer) of one report, or the
    InvalidArgument the manager raised for it."""
    positions, statistics, dropped = validate(request, state)
    return decide(state, positions, statistics, dropped, request.sequence)


# --- validation (validation.py before the fast path) ------------------------------------------


def _decode(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    try:
        return wire.decode(tensor, field)
    except wire.WireError as error:
        raise InvalidArgument(error.field, str(error).removeprefix(f"{error.field}: ")) from error


def validate(request: pb.ReportBlockRequest, state: SessionState):
    if request.phase not in PHASES:
        raise InvalidArgument("phase", f"must be PHASE_PREFILL or PHASE_DECODE, got {request.phase}")
    positions = _positions(request, state.last_position)
    settings = state.settings
    if len(request.layers) != settings.geometry.num_layers:
        raise InvalidArgument("layers", f"expected {settings.geometry.num_layers} layers, got {len(request.layers)}")
    dropped = tuple(_dropped(state.positions[i], positions, window)
                    for i, window in enumerate(settings.geometry.sliding_windows))
    statistics = tuple(
        _layer(layer, i, state.cache_lengths[i], len(positions), dropped[i], state)
        for i, layer in enumerate(request.layers)
    )
    return positions, statistics, dropped


def _dropped(tracked: np.ndarray, new: np.ndarray, window: int) -> int:
    if window <= 0:
        return 0
    cached = np.concatenate([tracked, np.broadcast_to(new.astype(tracked.dtype), (tracked.shape[0], new.size))], axis=1)
    return droppable(cached, int(new[-1]), window)


def _positions(request: pb.ReportBlockRequest, last_position: int) -> np.ndarray:
    if not request.HasField("positions"):
        raise InvalidArgument("positions", "missing")
    tensor = request.positions
    if tensor.dtype != tensor_pb2.DTYPE_INT64:
        raise InvalidArgument("positions.dtype", f"must be DTYPE_INT64, got {wire.dtype_name(tensor.dtype)}")
    if len(tensor.shape) != 1:
        raise InvalidArgument("positions.shape", f"must be 1-D (new_tokens,), got {list(tensor.shape)}")
    positions = _decode(tensor, "positions")
    if positions.size == 0:
        raise InvalidArgument("positions", "no new tokens")
    if positions.size > 1 and not (np.diff(positions) > 0).all():
        raise InvalidArgument("positions", "must be strictly increasing")
    if positions[0] <= last_position or positions[0] < 0:
        raise InvalidArgument("positions", f"first position {positions[0]} must be >= 0 and above the last one reported")
    if positions[-1] > MAX_POSITION:
        raise InvalidArgument("positions", f"position {positions[-1]} exceeds {MAX_POSITION}")
    return positions


def _layer(layer: pb.LayerStatistics, index: int, tracked: int, new_tokens: int, dropped: int,
           state: SessionState) -> dict[StatisticRequirement, np.ndarray]:
    field = f"layers[{index}]"
    expected_length = tracked + new_tokens - dropped
    settings = state.settings
    if layer.layer != index:
        raise InvalidArgument(f"{field}.layer", f"layers must come in order: expected {index}, got {layer.layer}")
    if layer.cache_length != expected_length:
        raise InvalidArgument(
            f"{field}.cache_length",
            # The session's own lengths stay out of the message: errors reveal no state.
            f"got {layer.cache_length}, which is not the session's cached tokens + the {new_tokens} new ones"
            + (" - those out of the sliding window" if dropped else ""),
        )
    if len(layer.values) != len(settings.statistics):
        raise InvalidArgument(f"{field}.values", f"expected {len(settings.statistics)} tensors (one per negotiated statistic), got {len(layer.values)}")
    shape = (settings.geometry.num_kv_heads, expected_length)
    statistics = {}
    for k, (requirement, tensor) in enumerate(zip(settings.statistics, layer.values)):
        name = f"{field}.values[{k}]"
        dtype = requirement.wire_dtype(settings.statistics_dtype)
        if tensor.dtype != dtype:
            raise InvalidArgument(
                f"{name}.dtype", f"{requirement.name} must be {wire.dtype_name(dtype)}, got {wire.dtype_name(tensor.dtype)}"
            )
        if tuple(tensor.shape) != shape:
            raise InvalidArgument(f"{name}.shape", f"{requirement.name} must have shape {list(shape)}, got {list(tensor.shape)}")
        values = np.asarray(_decode(tensor, name), dtype=np.float32)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InvalidArgument(name, f"{requirement.name} holds NaN or Inf")
        if requirement.non_negative and low < 0:
            raise InvalidArgument(name, f"{requirement.name} must be non-negative")
        statistics[requirement] = values
    return statistics


# --- the decision (decision.py before the fast path) -------------------------------------------


def decide(state: SessionState, report_positions: np.ndarray, report_statistics, report_dropped, sequence: int):
    settings = state.settings
    policy = settings.policy()
    allocator = settings.allocator()
    heads = settings.geometry.num_kv_heads
    new_positions = np.broadcast_to(report_positions.astype(np.int32), (heads, report_positions.size))
    windows = settings.geometry.sliding_windows
    last_position = int(report_positions[-1])

    contexts, unseen = [], []
    for layer, statistics in enumerate(report_statistics):
        dropped = report_dropped[layer] if report_dropped else 0
        previous = state.accumulators[layer][:, dropped:] if policy.accumulates else None
        accumulator = policy.accumulate(previous, statistics) if policy.accumulates else None
        positions = np.concatenate([state.positions[layer], new_positions], axis=1)[:, dropped:]
        contexts.append(LayerContext(layer, sequence, positions, statistics, accumulator))
        mask = hidden(positions, last_position, windows[layer]) if windows[layer] else None
        unseen.append(mask if mask is not None and mask.any() else None)
    lengths = [ctx.positions.shape[1] for ctx in contexts]
    scores = [policy.score(ctx) for ctx in contexts] if allocator.needs_scores else None
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
            sink = _sinks_cached(positions, settings.sink) if windows[layer] else settings.sink
            keep, evicted_scores = select_keep_scored(score, budget, sink, settings.recent)
            if output_errors:
                evicted_errors.append(np.where(np.isneginf(evicted_scores), 0.0, evicted_scores)
                                      if unseen[layer] is not None else evicted_scores)
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
        last_position=int(report_positions[-1]),
        last_response=response.SerializeToString(),
        reports=state.reports + 1,
        evicted_tokens=state.evicted_tokens + evicted,
    )
    return response, next_state, tuple(evicted_errors)


def _scored_unseen(score: np.ndarray, unseen: np.ndarray | None, value: float) -> np.ndarray:
    return score if unseen is None else np.where(unseen, np.float32(value), score)


def _sinks_cached(positions: np.ndarray, sink: int) -> int:
    return int(np.count_nonzero(positions[0, :sink] < sink))
