"""Checks a ReportBlockRequest against its session before anything is computed or stored.

Every error is an InvalidArgument naming the field (`positions`, `layers[3].values[1].dtype`...),
so a malformed report never reaches the state.

Two paths, one answer. The bulk path checks every layer's layout (layer index, cache length,
tensor count, dtypes, shapes, byte lengths), then decodes each statistic for all layers at once
and checks its values with one integer max over the raw bits (kvevict.cache_manager.batch);
with the compiled kernels it only checks them, where protobuf's bytes lie (one read-only pass),
and the decision decodes what it reads (kernels.Statistic; `values` decodes on first use).
Anything it does not accept (a malformed report, a NaN, an infinity, a negative value where
none may be, or a -0.0) goes to the exact path, which checks layer after layer, tensor after
tensor, and so raises the error the first offending field gets, named as always
(`layers[2].values[1]: ... holds NaN or Inf`); a report it accepts after all (a -0.0) is decoded
there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kvevict import wire
from kvevict.cache_manager import kernels
from kvevict.cache_manager.batch import Layout, decode_statistic
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.sliding import droppable
from kvevict.cache_manager.state import SessionState
from kvevict.cache_manager.statistics import StatisticRequirement
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2

_KERNEL_KINDS = {tensor_pb2.DTYPE_FLOAT16: kernels.FLOAT16, tensor_pb2.DTYPE_BFLOAT16: kernels.BFLOAT16,
                 tensor_pb2.DTYPE_FLOAT32: kernels.FLOAT32}
_WIRE_DTYPES = {kind: dtype for dtype, kind in _KERNEL_KINDS.items()}
# Positions are tracked as int32 (half the state of int64); no context comes near this.
MAX_POSITION = np.iinfo(np.int32).max
PHASES = (pb.PHASE_PREFILL, pb.PHASE_DECODE)


@dataclass(frozen=True)
class ValidatedReport:
    """A report's content, checked (and decoded, or decodable: `values`)."""

    phase: int
    positions: np.ndarray  # (new_tokens,) int64, strictly increasing, after every tracked position
    # Every layer's (num_kv_heads, cache_length), in the order of `values`' flat buffers.
    layout: Layout
    # Statistic -> float32 values of every layer, flat in `layout`, finite (fresh buffers); None
    # where `raw` holds them undecoded.
    decoded: dict[StatisticRequirement, np.ndarray] | None = None
    # Statistic -> its checked raw data per layer (kernels.Statistic): the bulk path's, with the
    # compiled kernels.
    raw: dict[StatisticRequirement, kernels.Statistic] | None = None
    # Per layer: leading tokens (tracked, then new) that left the layer's sliding window, dropped
    # before cache_length (see kvevict.cache_manager.sliding); 0 for full-attention layers.
    dropped: tuple[int, ...] = ()
    # True when the bulk check passed: besides finite, non-negative statistics hold no -0.0, so
    # scores built from them order like their bit patterns (kvevict.cache_manager.selection).
    bulk: bool = True
    # The bulk path's raw bytes, statistic by statistic, layer by layer (`buffers[k][layer]`),
    # for the request digest: protobuf copies a bytes field on each access. None: not kept.
    buffers: tuple[tuple[bytes, ...], ...] | None = None

    @cached_property
    def values(self) -> dict[StatisticRequirement, np.ndarray]:
        """Statistic -> float32 values of every layer, flat in `layout`, finite (fresh buffers,
        which the decision may turn into its results in place)."""
        if self.decoded is not None:
            return self.decoded
        assert self.raw is not None
        return {req: decode_statistic(b"".join(stat.buffers), _WIRE_DTYPES[stat.kind], req.non_negative)
                for req, stat in self.raw.items()}

    @cached_property
    def statistics(self) -> tuple[dict[StatisticRequirement, np.ndarray], ...]:
        """Per layer: statistic -> (num_kv_heads, cache_length) float32 view."""
        views = {req: self.layout.layers(values) for req, values in self.values.items()}
        return tuple({req: views[req][layer] for req in self.values} for layer in range(len(self.layout.lengths)))


def decode(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """kvevict.wire.decode (zero-copy), with WireError turned into InvalidArgument."""
    try:
        return wire.decode(tensor, field)
    except wire.WireError as error:
        raise InvalidArgument(error.field, str(error).removeprefix(f"{error.field}: ")) from error


@dataclass(frozen=True)
class PerHeadReport:
    """A per-head session's report, checked and decoded (kvevict.cache_manager.per_head)."""

    phase: int
    positions: np.ndarray  # (new_tokens,) int64, strictly increasing, after every tracked position
    head_lengths: np.ndarray  # (layers, heads) int64: each head's tokens, the new ones included
    # Statistic -> per layer its (sum of the layer's head_lengths,) float32 values, head after head.
    values: dict[StatisticRequirement, tuple[np.ndarray, ...]]


def validate_per_head_report(request: pb.ReportBlockRequest, state: SessionState) -> PerHeadReport:
    """validate_report for a per-head session: every layer's head_lengths (each head's tracked
    tokens + the new ones), cache_length (their sum) and its statistics of shape (cache_length,),
    with the same dtype, finiteness and sign checks, field by field."""
    if request.phase not in PHASES:
        raise InvalidArgument("phase", f"must be PHASE_PREFILL or PHASE_DECODE, got {request.phase}")
    positions = _positions(request, state.last_position)
    settings = state.settings
    geometry = settings.geometry
    if len(request.layers) != geometry.num_layers:
        raise InvalidArgument("layers", f"expected {geometry.num_layers} layers, got {len(request.layers)}")
    heads = geometry.num_kv_heads
    expected = state.head_cache_lengths + len(positions)
    values: dict[StatisticRequirement, list[np.ndarray]] = {req: [] for req in settings.statistics}
    for index, layer in enumerate(request.layers):
        field = f"layers[{index}]"
        if layer.layer != index:
            raise InvalidArgument(f"{field}.layer", f"layers must come in order: expected {index}, got {layer.layer}")
        if len(layer.head_lengths) != heads:
            raise InvalidArgument(f"{field}.head_lengths", f"expected {heads} entries (one per KV head), got "
                                                           f"{len(layer.head_lengths)}")
        lengths = np.asarray(layer.head_lengths, dtype=np.int64)
        wrong = np.flatnonzero(lengths != expected[index])
        if wrong.size:
            # The session's own lengths stay out of the message: errors reveal no state.
            raise InvalidArgument(f"{field}.head_lengths", f"head {int(wrong[0])}: got {int(lengths[wrong[0]])}, which "
                                  f"is not the session's cached tokens of that head + the {len(positions)} new ones")
        total = int(lengths.sum())
        if layer.cache_length != total:
            raise InvalidArgument(f"{field}.cache_length", f"got {layer.cache_length}, must be the sum of head_lengths "
                                                           f"({total})")
        if len(layer.values) != len(settings.statistics):
            raise InvalidArgument(f"{field}.values", f"expected {len(settings.statistics)} tensors (one per negotiated "
                                                     f"statistic), got {len(layer.values)}")
        for k, (requirement, tensor) in enumerate(zip(settings.statistics, layer.values)):
            values[requirement].append(_statistic(tensor, f"{field}.values[{k}]", requirement,
                                                  settings.statistics_dtype, (total,)))
    return PerHeadReport(request.phase, positions, expected,
                         {req: tuple(layers) for req, layers in values.items()})


def _refuse_head_lengths(request: pb.ReportBlockRequest) -> None:
    for index, layer in enumerate(request.layers):
        if layer.head_lengths:
            raise InvalidArgument(f"layers[{index}].head_lengths", "only per-head sessions report head lengths; "
                                                                   "this session's heads share one cache length")


def validate_report(request: pb.ReportBlockRequest, state: SessionState) -> ValidatedReport:
    """Validates everything but the session id and sequence number (the service checks those)."""
    if request.phase not in PHASES:
        raise InvalidArgument("phase", f"must be PHASE_PREFILL or PHASE_DECODE, got {request.phase}")
    positions = _positions(request, state.last_position)
    settings = state.settings
    if len(request.layers) != settings.geometry.num_layers:
        raise InvalidArgument("layers", f"expected {settings.geometry.num_layers} layers, got {len(request.layers)}")
    _refuse_head_lengths(request)
    dropped = tuple(_dropped(state.positions[i], positions, window)
                    for i, window in enumerate(settings.geometry.sliding_windows))
    tracked = state.cache_lengths
    layout = Layout(settings.geometry.num_kv_heads, tuple(n + len(positions) - d for n, d in zip(tracked, dropped)))
    checked = _bulk(request, state, layout)
    if checked is not None:
        decoded, raw, buffers = checked
        return ValidatedReport(request.phase, positions, layout, decoded=decoded, raw=raw, dropped=dropped,
                               buffers=buffers)
    # The exact path: raises the first offending field's error, or decodes what the bulk check
    # left to it (a -0.0).
    statistics = [
        _layer(layer, i, tracked[i], len(positions), dropped[i], state) for i, layer in enumerate(request.layers)
    ]
    values = {req: np.concatenate([layer[req].ravel() for layer in statistics]) for req in settings.statistics}
    return ValidatedReport(request.phase, positions, layout, decoded=values, dropped=dropped, bulk=False)


def _bulk(request: pb.ReportBlockRequest, state: SessionState, layout: Layout
          ) -> tuple[dict[StatisticRequirement, np.ndarray] | None, dict[StatisticRequirement, kernels.Statistic] | None,
                     tuple[tuple[bytes, ...], ...]] | None:
    """Every statistic decoded for all layers at once (or, with the kernels, checked where it
    lies: the raw data), with the raw bytes read; or None where the exact path must decide
    (anything malformed or any value the bulk check does not accept)."""
    settings = state.settings
    requirements = settings.statistics
    dtypes = [req.wire_dtype(settings.statistics_dtype) for req in requirements]
    itemsizes = [4 if dtype == tensor_pb2.DTYPE_FLOAT32 else 2 for dtype in dtypes]
    heads = layout.heads
    count = len(requirements)
    data: list[list[bytes]] = [[] for _ in requirements]
    appends = [d.append for d in data]
    for index, (layer, length) in enumerate(zip(request.layers, layout.lengths)):
        values = layer.values
        if layer.layer != index or layer.cache_length != length or len(values) != count:
            return None
        shape = [heads, length]  # a repeated field compares equal to a list of its items
        for k, tensor in enumerate(values):
            if tensor.dtype != dtypes[k] or tensor.shape != shape:
                return None
            raw = tensor.data
            if len(raw) != heads * length * itemsizes[k]:
                return None
            appends[k](raw)
    if kernels.enabled:
        sizes = layout.lengths_array * heads
        raw = {}
        for k, requirement in enumerate(requirements):
            statistic = kernels.Statistic.of(data[k], _KERNEL_KINDS[dtypes[k]], sizes)
            if not statistic.check(requirement.non_negative):
                return None
            raw[requirement] = statistic
        return None, raw, tuple(statistic.buffers for statistic in raw.values())
    values = {}
    for k, requirement in enumerate(requirements):
        decoded = decode_statistic(b"".join(data[k]), dtypes[k], requirement.non_negative)
        if decoded is None:
            return None
        values[requirement] = decoded
    return values, None, tuple(tuple(d) for d in data)


def _dropped(tracked: np.ndarray, new: np.ndarray, window: int) -> int:
    """Tokens of one layer's tracked + new tokens that no later query can see (the worker drops
    the same ones from its cache before it reports the layer's cache_length)."""
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
    positions = decode(tensor, "positions")
    if positions.size == 0:
        raise InvalidArgument("positions", "no new tokens")
    if positions.size > 1 and not (np.diff(positions) > 0).all():
        raise InvalidArgument("positions", "must be strictly increasing")
    if positions[0] <= last_position or positions[0] < 0:
        raise InvalidArgument("positions", f"first position {positions[0]} must be >= 0 and above the last one reported")
    if positions[-1] > MAX_POSITION:
        raise InvalidArgument("positions", f"position {positions[-1]} exceeds {MAX_POSITION}")
    return positions


def _layer(
    layer: pb.LayerStatistics, index: int, tracked: int, new_tokens: int, dropped: int, state: SessionState
) -> dict[StatisticRequirement, np.ndarray]:
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
    return {requirement: _statistic(tensor, f"{field}.values[{k}]", requirement, settings.statistics_dtype, shape)
            for k, (requirement, tensor) in enumerate(zip(settings.statistics, layer.values))}


def _statistic(tensor: tensor_pb2.Tensor, name: str, requirement: StatisticRequirement, statistics_dtype: int,
               shape: tuple[int, ...]) -> np.ndarray:
    """One statistics tensor checked (dtype, shape, finite, sign) and decoded to float32."""
    dtype = requirement.wire_dtype(statistics_dtype)
    if tensor.dtype != dtype:
        raise InvalidArgument(
            f"{name}.dtype", f"{requirement.name} must be {wire.dtype_name(dtype)}, got {wire.dtype_name(tensor.dtype)}"
        )
    if tuple(tensor.shape) != shape:
        raise InvalidArgument(f"{name}.shape", f"{requirement.name} must have shape {list(shape)}, got {list(tensor.shape)}")
    values = np.asarray(decode(tensor, name), dtype=np.float32)
    # Two reductions instead of elementwise masks: NaN propagates into min and max.
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InvalidArgument(name, f"{requirement.name} holds NaN or Inf")
    if requirement.non_negative and low < 0:
        raise InvalidArgument(name, f"{requirement.name} must be non-negative")
    return values
