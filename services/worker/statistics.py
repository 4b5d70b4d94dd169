"""Per-token statistics the cache manager negotiated, measured inside attention.

Contract (see proto `Statistic`): values are per layer, per KV head, per cached token; the query
heads of a GQA group are averaged (the group acts as one "virtual query" whose output is the mean
of the group's outputs). A *report period* is the span of queries between two reports: one
prefill block, or `block_size` decode steps. Attention statistics cover the queries of the
period; a window statistic covers its last `window` queries (all of them if the period is
shorter). Value and key statistics are computed from the cache at report time. Everything is
accumulated in float32 whatever the model dtype, and cast to the wire dtype only when sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvevict.v1 import cache_manager_pb2 as pb

ATTENTION_STATISTICS = {pb.STATISTIC_ATTN_SUM, pb.STATISTIC_ATTN_WINDOW, pb.STATISTIC_VALUE_DEV_WINDOW,
                        pb.STATISTIC_VALUE_DEV_RUNNING}


@dataclass(frozen=True)
class Requirement:
    """One negotiated statistic; `window` only for the window statistics."""

    statistic: int
    window: int = 0

    @classmethod
    def from_proto(cls, message: pb.StatisticRequirement) -> "Requirement":
        return cls(statistic=message.statistic, window=message.window)


@dataclass
class _LayerAccumulators:
    attn_sum: torch.Tensor | None = None  # (Hkv, L)
    attn_window: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> (Hkv, L)
    out_window: dict[int, torch.Tensor] = field(default_factory=dict)  # window -> (Hkv, d) summed outputs
    window_queries: dict[int, int] = field(default_factory=dict)
    out_running: torch.Tensor | None = None  # (Hkv, d), never reset
    running_queries: int = 0


class StatisticsCollector:
    """Accumulates the negotiated statistics of every layer over one report period."""

    def __init__(self, requirements: list[Requirement], num_layers: int, cache: "PositionSource") -> None:
        self.requirements = list(requirements)
        self.cache = cache
        self.needs_attention = any(r.statistic in ATTENTION_STATISTICS for r in self.requirements)
        self._windows = sorted({r.window for r in self.requirements if r.statistic in
                                (pb.STATISTIC_ATTN_WINDOW, pb.STATISTIC_VALUE_DEV_WINDOW)})
        self._wants_sum = any(r.statistic == pb.STATISTIC_ATTN_SUM for r in self.requirements)
        self._wants_running = any(r.statistic == pb.STATISTIC_VALUE_DEV_RUNNING for r in self.requirements)
        self._layers = [_LayerAccumulators() for _ in range(num_layers)]
        self._period_length = 0
        self._queries_seen: list[int] = [0] * num_layers

    def start_period(self, planned_queries: int) -> None:
        """Resets the period accumulators; `planned_queries` locates the window at its end."""
        self._period_length = planned_queries
        self._queries_seen = [0] * len(self._layers)
        for acc in self._layers:
            acc.attn_sum = None
            acc.attn_window.clear()
            acc.out_window.clear()
            acc.window_queries.clear()

    def record_attention(self, layer: int, probs: torch.Tensor, out: torch.Tensor) -> None:
        """Takes one layer's float32 probabilities (Hkv, g, q, L) and outputs (Hkv, g, q, d)."""
        acc = self._layers[layer]
        q_len = probs.shape[2]
        first = self._queries_seen[layer]
        self._queries_seen[layer] += q_len
        group_probs = probs.mean(dim=1)  # (Hkv, q, L)
        group_out = out.mean(dim=1)  # (Hkv, q, d)
        if self._wants_sum:
            acc.attn_sum = _grow_add(acc.attn_sum, group_probs.sum(dim=1))
        if self._wants_running:
            total = group_out.sum(dim=1)
            acc.out_running = total if acc.out_running is None else acc.out_running + total
            acc.running_queries += q_len
        for window in self._windows:
            # Query i of the period is in the window when i >= planned - window.
            start = max(self._period_length - window - first, 0)
            if start >= q_len:
                continue
            acc.attn_window[window] = _grow_add(acc.attn_window.get(window), group_probs[:, start:].sum(dim=1))
            total = group_out[:, start:].sum(dim=1)
            previous = acc.out_window.get(window)
            acc.out_window[window] = total if previous is None else previous + total
            acc.window_queries[window] = acc.window_queries.get(window, 0) + q_len - start

    def layer_statistics(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> list[torch.Tensor]:
        """The negotiated statistics of one layer, float32 (Hkv, L), in negotiated order.

        keys/values: the layer's cache, (1, Hkv, L, d).
        """
        acc = self._layers[layer]
        k32, v32 = keys[0].float(), values[0].float()
        num_kv_heads, length = k32.shape[0], k32.shape[1]
        results = []
        for req in self.requirements:
            if req.statistic == pb.STATISTIC_ATTN_SUM:
                results.append(_padded(acc.attn_sum, num_kv_heads, length, k32.device))
            elif req.statistic == pb.STATISTIC_ATTN_WINDOW:
                results.append(_padded(acc.attn_window.get(req.window), num_kv_heads, length, k32.device))
            elif req.statistic == pb.STATISTIC_VALUE_DEV_WINDOW:
                count = acc.window_queries.get(req.window, 0)
                reference = acc.out_window[req.window] / count if count else v32.mean(dim=1)
                results.append(torch.linalg.vector_norm(v32 - reference[:, None, :], dim=-1))
            elif req.statistic == pb.STATISTIC_VALUE_DEV_RUNNING:
                reference = (acc.out_running / acc.running_queries if acc.running_queries
                             else v32.mean(dim=1))
                results.append(torch.linalg.vector_norm(v32 - reference[:, None, :], dim=-1))
            elif req.statistic == pb.STATISTIC_VALUE_DEV_MEAN:
                results.append(torch.linalg.vector_norm(v32 - v32.mean(dim=1, keepdim=True), dim=-1))
            elif req.statistic == pb.STATISTIC_KEY_COSINE:
                unit = F.normalize(k32, dim=-1)
                mean_unit = F.normalize(unit.mean(dim=1), dim=-1)
                results.append(torch.einsum("hkd,hd->hk", unit, mean_unit))
            else:
                raise ValueError(f"the worker cannot compute statistic {req.statistic}")
        return results


class PositionSource:
    """What the collector needs of the cache: absolute positions per layer (for sliding windows)."""

    def positions(self, layer: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _grow_add(total: torch.Tensor | None, addition: torch.Tensor) -> torch.Tensor:
    """Adds (Hkv, L) to an accumulator that may cover fewer (older) tokens."""
    if total is None:
        return addition
    return F.pad(total, (0, addition.shape[1] - total.shape[1])) + addition


def _padded(total: torch.Tensor | None, num_kv_heads: int, length: int, device: torch.device) -> torch.Tensor:
    if total is None:
        return torch.zeros(num_kv_heads, length, device=device)
    return F.pad(total, (0, length - total.shape[1]))
