"""Per-token statistics the cache manager negotiated, measured inside attention.

Contract (see proto `Statistic`): values are per layer, per KV head, per cached token; the query
heads of a GQA group are averaged (the group acts as one "virtual query" whose attention is the
mean of the group's). A *report period* is the span of queries between two reports: one
prefill block, or `block_size` decode steps. Attention statistics cover the queries of the
period; a window statistic covers its last `window` queries (all of them if the period is
shorter). The accumulated attention (H2O's CAOTE reference) covers every query since each token
arrived. Value and key statistics are computed from the cache at report time. Everything is
accumulated in float32 whatever the model dtype, and cast to the wire dtype only when sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.observers import ObserverQueries
from kvevict.worker.query_errors import (output_projection, projected_errors, projected_gram, projection_slices,
                                         query_errors)
from kvevict.worker.reference import excluded_deviation, key_cosine, mean_deviation, reference_weights

_FLOAT16_MAX = float(torch.finfo(torch.float16).max)
# References whose weights come from attention probabilities.
_ATTENTION_REFERENCES = {pb.REFERENCE_WINDOW_ATTENTION, pb.REFERENCE_ACCUMULATED_ATTENTION}
# Per-query output errors over a window (kvevict.worker.query_errors).
QUERY_ERRORS = (pb.STATISTIC_QUERY_EVICT_ERROR, pb.STATISTIC_QUERY_VALUE_ERROR, pb.STATISTIC_QUERY_KEY_ERROR,
                pb.STATISTIC_QUERY_KEY_VALUE_ERROR, pb.STATISTIC_QUERY_PROJECTED_ERROR)


@dataclass(frozen=True)
class Requirement:
    """One negotiated statistic, as OpenSessionResponse gives it."""

    statistic: int
    window: int = 0
    reference: int = pb.REFERENCE_UNSPECIFIED
    pool_kernel: int = 0
    dtype: int = tensor_pb2.DTYPE_FLOAT32

    @classmethod
    def from_proto(cls, message: pb.StatisticRequirement, session_dtype: int) -> "Requirement":
        """`session_dtype` (OpenSessionResponse.statistics_dtype) applies where the requirement
        names no dtype of its own."""
        dtype = message.dtype or session_dtype
        if not dtype:
            raise ValueError(f"the manager gave statistic {message.statistic} no wire dtype")
        return cls(statistic=message.statistic, window=message.window, reference=message.reference,
                   pool_kernel=message.pool_kernel, dtype=dtype)

    @property
    def needs_attention(self) -> bool:
        return self.statistic in (pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW, *QUERY_ERRORS) or (
            self.statistic == pb.STATISTIC_VALUE_DEV_EXCLUDED and self.reference in _ATTENTION_REFERENCES)

    @property
    def attention_window(self) -> int:
        """The query window this statistic needs (summed attention or output errors) over (0: none)."""
        windowed = (self.statistic in (pb.STATISTIC_ATTN_WINDOW, *QUERY_ERRORS)
                    or self.reference == pb.REFERENCE_WINDOW_ATTENTION)
        return self.window if windowed else 0


@dataclass
class _LayerAccumulators:
    attn_sum: torch.Tensor | None = None  # (Hkv, L)
    attn_window: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> (Hkv, L)
    query_errors: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (statistic, window) -> (Hkv, L)
    # Attention accumulated over the session, never reset, for the tokens still cached at the
    # last forward, with their absolute positions to realign it after evictions.
    accumulated: torch.Tensor | None = None  # (Hkv, L)
    accumulated_positions: torch.Tensor | None = None  # (Hkv, L)


class StatisticsCollector:
    """Accumulates the negotiated statistics of every layer over one report period."""

    def __init__(self, requirements: list[Requirement], num_layers: int, cache: "PositionSource") -> None:
        self.requirements = list(requirements)
        self.cache = cache
        self.needs_attention = any(r.needs_attention for r in self.requirements)
        self._windows = sorted({r.attention_window for r in self.requirements} - {0})
        self._wants_sum = any(r.statistic == pb.STATISTIC_ATTN_SUM for r in self.requirements)
        self._wants_accumulated = any(r.reference == pb.REFERENCE_ACCUMULATED_ATTENTION for r in self.requirements)
        self._query_errors = sorted({(r.statistic, r.window) for r in self.requirements if r.statistic in QUERY_ERRORS})
        # The key error needs each query's logits beside its probabilities.
        self.needs_logits = any(statistic == pb.STATISTIC_QUERY_KEY_ERROR for statistic, _ in self._query_errors)
        # LaProx's projected error: each layer's W_O Gram matrices and slices, from its attention module.
        self._needs_projection = any(s == pb.STATISTIC_QUERY_PROJECTED_ERROR for s, _ in self._query_errors)
        self._projections: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layers = [_LayerAccumulators() for _ in range(num_layers)]
        # When set, window statistics are the observers' attention instead of the period's last queries.
        self.observers: ObserverQueries | None = None
        self._period_length = 0
        self._queries_seen: list[int] = [0] * num_layers

    def start_period(self, planned_queries: int) -> None:
        """Resets the period accumulators; `planned_queries` locates the window at its end."""
        self._period_length = planned_queries
        self._queries_seen = [0] * len(self._layers)
        for acc in self._layers:
            acc.attn_sum = None
            acc.attn_window.clear()
            acc.query_errors.clear()

    @property
    def needs_every_query(self) -> bool:
        """Whether every query's probabilities are needed (sums, accumulated attention)."""
        return self._wants_sum or self._wants_accumulated

    def first_needed_query(self, layer: int, q_len: int) -> int:
        """The first of this forward's `q_len` queries whose probabilities a statistic needs
        (q_len: none): every query for sums and accumulated attention, else the window's."""
        if self._wants_sum or self._wants_accumulated:
            return 0
        if self.observers is not None or not self._windows:  # the window is the observers' queries
            return q_len
        first = self._queries_seen[layer]
        return min([q_len] + [max(self._period_length - window - first, 0) for window in self._windows])

    def record_attention(self, layer: int, probs: torch.Tensor | None, skipped: int = 0,
                         queries: int | None = None, values: torch.Tensor | None = None,
                         logits: torch.Tensor | None = None, module: torch.nn.Module | None = None,
                         kv_shape: tuple[int, int] | None = None) -> None:
        """Takes one layer's float32 probabilities (Hkv, g, q, L) over its current cache, of the
        forward's `queries` queries but the `skipped` first (first_needed_query; None: none);
        with output errors to measure, the layer's values (Hkv, L, d) and, for the key error,
        the probabilities' logits. `kv_shape` (KV heads, head dim) sizes the output projection
        when no values come (observers' errors are measured at the report, from the cache)."""
        if self._needs_projection and layer not in self._projections and module is not None:
            shape = (values.shape[0], values.shape[-1]) if values is not None else kv_shape
            if shape is not None:
                heads, head_dim = shape
                weight = output_projection(module).detach()
                self._projections[layer] = (projected_gram(weight, heads, head_dim),
                                            projection_slices(weight, heads, head_dim))
        q_len = queries if queries is not None else skipped + probs.shape[2]
        first = self._queries_seen[layer] + skipped
        self._queries_seen[layer] += q_len
        if probs is None:
            return
        acc = self._layers[layer]
        q_len = probs.shape[2]
        group_probs = probs.mean(dim=1)  # (Hkv, q, L)
        period_sum = group_probs.sum(dim=1)
        if self._wants_sum:
            acc.attn_sum = _grow_add(acc.attn_sum, period_sum)
        if self._wants_accumulated:
            self._accumulate(layer, acc, period_sum, q_len)
        for window in self._windows:
            # Query i of the period is in the window when i >= planned - window.
            start = max(self._period_length - window - first, 0)
            if start >= q_len:
                continue
            acc.attn_window[window] = _grow_add(acc.attn_window.get(window), group_probs[:, start:].sum(dim=1))
        for statistic, window in self._query_errors:
            start = max(self._period_length - window - first, 0)
            if start >= q_len:
                continue
            errors = self._errors(layer, statistic, probs[:, :, start:], values,
                                  None if logits is None else logits[:, :, start:])
            key = (statistic, window)
            acc.query_errors[key] = _grow_add(acc.query_errors.get(key), errors)

    def _errors(self, layer: int, statistic: int, probs: torch.Tensor, values: torch.Tensor,
                logits: torch.Tensor | None, head: int | None = None) -> torch.Tensor:
        """Per-query errors; `head`: probs and values are KV head `head`'s alone."""
        if statistic == pb.STATISTIC_QUERY_PROJECTED_ERROR:
            gram, slices = self._projections[layer]
            if head is not None:
                gram, slices = gram[head : head + 1], slices[head : head + 1]
            return projected_errors(probs, values, gram.to(probs.device), slices.to(probs.device))
        return query_errors(statistic, probs, values, logits)

    def columns_kept(self, layer: int, index: torch.Tensor, length: int, positions: torch.Tensor) -> None:
        """The cache of `layer` ({length} tokens) kept columns `index` (Hkv, K) at `positions`:
        the sums follow, so a report built after an eviction (pipelined: the previous period's
        decision applied after this period's forwards) reads every token's own sums."""
        acc = self._layers[layer]

        def follow(total: torch.Tensor | None) -> torch.Tensor | None:
            if total is None:
                return None
            return _padded(total, index.shape[0], length, total.device).gather(1, index.to(total.device))

        acc.attn_sum = follow(acc.attn_sum)
        acc.attn_window = {window: follow(total) for window, total in acc.attn_window.items()}
        acc.query_errors = {key: follow(total) for key, total in acc.query_errors.items()}
        if acc.accumulated is not None:  # it covers every token cached at the last forward, by position
            positions = positions.to(acc.accumulated.device).contiguous()
            acc.accumulated = acc.accumulated.gather(1, torch.searchsorted(acc.accumulated_positions, positions))
            acc.accumulated_positions = positions

    def _accumulate(self, layer: int, acc: _LayerAccumulators, addition: torch.Tensor, q_len: int) -> None:
        positions = self.cache.positions(layer).to(addition.device)  # the q new tokens last
        cached = positions[:, : positions.shape[1] - q_len]
        previous = acc.accumulated
        if previous is None:
            previous = addition.new_zeros(cached.shape)
        elif previous.shape[1] != cached.shape[1]:
            # Tokens were evicted since the last forward: the survivors are a subsequence (in
            # order) of the tokens summed then, found by their positions.
            previous = previous.gather(1, torch.searchsorted(acc.accumulated_positions, cached.contiguous()))
        acc.accumulated = _grow_add(previous, addition)
        acc.accumulated_positions = positions.contiguous()

    def layer_statistics(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                         unseen: int = 0) -> list[torch.Tensor]:
        """The negotiated statistics of one layer, float32 (Hkv, L - unseen), in negotiated order,
        over the cached tokens but the `unseen` leading ones (out of every later query's sliding
        window: they leave the cache, so means, cosines and reference outputs leave them out).

        keys/values: the layer's cache, (1, Hkv, L, d).
        """
        k32, v32 = keys[0, :, unseen:].float(), values[0, :, unseen:].float()
        num_kv_heads, length = keys.shape[1], keys.shape[2]

        def visible(total: torch.Tensor | None) -> torch.Tensor:
            return _padded(total, num_kv_heads, length, k32.device)[:, unseen:]

        return self._statistics(layer, k32, v32, self.cache.positions(layer)[:, unseen:], visible, self.observers)

    def _statistics(self, layer: int, k32: torch.Tensor, v32: torch.Tensor, positions: torch.Tensor,
                    visible: Callable[[torch.Tensor | None], torch.Tensor], observers: ObserverQueries | None,
                    head: int | None = None) -> list[torch.Tensor]:
        """The statistics over keys/values (H, L, d) float32 at `positions` (H, L): the layer's
        heads, or only KV head `head` of it (H = 1); `visible` gives an accumulator's columns."""
        acc = self._layers[layer]

        def window_attention(window: int) -> torch.Tensor:
            if observers is not None:
                return observers.attention(layer, k32, positions, window)
            return visible(acc.attn_window.get(window))

        results = []
        for req in self.requirements:
            if req.statistic == pb.STATISTIC_ATTN_SUM:
                results.append(visible(acc.attn_sum))
            elif req.statistic == pb.STATISTIC_ATTN_WINDOW:
                results.append(window_attention(req.window))
            elif req.statistic in QUERY_ERRORS:
                if observers is not None:  # the window is the observers' queries, on this cache
                    probs, logits = observers.probabilities(layer, k32, positions, req.window)
                    results.append(self._errors(layer, req.statistic, probs, v32, logits, head))
                else:
                    results.append(visible(acc.query_errors.get((req.statistic, req.window))))
            elif req.statistic == pb.STATISTIC_VALUE_DEV_MEAN:
                results.append(mean_deviation(v32))
            elif req.statistic == pb.STATISTIC_KEY_COSINE:
                results.append(key_cosine(k32))
            elif req.statistic == pb.STATISTIC_VALUE_DEV_EXCLUDED:
                weights = reference_weights(
                    req.reference, pool_kernel=req.pool_kernel, keys=k32, values=v32,
                    window_attention=window_attention(req.window) if req.window else None,
                    accumulated=visible(acc.accumulated), positions=positions)
                results.append(excluded_deviation(weights, v32))
            else:
                raise ValueError(f"the worker cannot compute statistic {req.statistic}")
        return results


class PositionSource:
    """What the collector and attention need of the cache: absolute positions per layer (sliding
    windows, realigning accumulated attention after evictions) and each layer's sliding window."""

    def positions(self, layer: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def window(self, layer: int) -> int:  # pragma: no cover - interface
        """The layer's sliding window, 0 for full attention."""
        raise NotImplementedError


def to_wire(statistic: torch.Tensor, dtype: int) -> tensor_pb2.Tensor:
    """A float32 statistic (Hkv, L) as the negotiated wire dtype, cast where it lies (GPU: half
    the bytes to move)."""
    if dtype == tensor_pb2.DTYPE_BFLOAT16:
        return wire.encode_bfloat16_bits(statistic.to(torch.bfloat16).view(torch.int16).cpu().numpy())
    if dtype == tensor_pb2.DTYPE_FLOAT16:
        # Saturate instead of overflowing to inf, which the manager rejects.
        statistic = statistic.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
    elif dtype != tensor_pb2.DTYPE_FLOAT32:
        raise ValueError(f"no statistics encoding for {wire.dtype_name(dtype)}")
    return wire.encode(statistic.cpu().numpy())


def _grow_add(total: torch.Tensor | None, addition: torch.Tensor) -> torch.Tensor:
    """Adds (Hkv, L) to an accumulator that may cover fewer (older) tokens."""
    if total is None:
        return addition
    return F.pad(total, (0, addition.shape[1] - total.shape[1])) + addition


def _padded(total: torch.Tensor | None, num_kv_heads: int, length: int, device: torch.device) -> torch.Tensor:
    if total is None:
        return torch.zeros(num_kv_heads, length, device=device)
    return F.pad(total, (0, length - total.shape[1]))
