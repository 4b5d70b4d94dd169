"""One sequence's KV cache under a manager session: block-wise forwards, reports, pruning."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.attention import COLLECTOR_KWARG
from kvevict.worker.kv_cache import PrunableCache
from kvevict.worker.manager_client import ManagerClient
from kvevict.worker.model_loader import geometry_of
from kvevict.worker.statistics import Requirement, StatisticsCollector

FLOAT16_MAX = float(np.finfo(np.float16).max)

# Called before every forward with the new tokens' positions (q,) and every layer's cached
# positions (Hkv, L) including them: exactly what each query of the forward can see.
ForwardObserver = Callable[[torch.Tensor, list[torch.Tensor]], None]


@dataclass
class EvictionSettings:
    """What a generation asks of the manager."""

    policy: pb.PolicySpec
    budget: pb.BudgetSpec
    block_size: int = 128
    statistics_dtype: int = tensor_pb2.DTYPE_FLOAT16


@dataclass
class SessionStats:
    """Counters of one session, for the eviction summary."""

    reports: int = 0
    manager_seconds: float = 0.0
    report_bytes: int = 0
    peak_lengths: list[int] = field(default_factory=list)
    peak_kv_bytes: int = 0


class CacheSession:
    """Runs a model block by block over one sequence, evicting as the manager decides."""

    def __init__(self, model: torch.nn.Module, manager: ManagerClient, settings: EvictionSettings,
                 observer: ForwardObserver | None = None) -> None:
        self.model = model
        self.manager = manager
        self.settings = settings
        self.observer = observer
        self.geometry = geometry_of(model)
        opened = manager.open_session(pb.OpenSessionRequest(
            geometry=self.geometry, policy=settings.policy, budget=settings.budget,
            block_size=settings.block_size, statistics_dtype=settings.statistics_dtype))
        self.session_id = opened.session_id
        self.report_every_block = opened.report_every_block
        self.layer_budgets = list(opened.layer_budgets)
        self.wire_dtype = np.float32 if opened.statistics_dtype == tensor_pb2.DTYPE_FLOAT32 else np.float16
        device = next(model.parameters()).device
        self.device = device
        self.cache = PrunableCache(self.geometry.num_layers, self.geometry.num_kv_heads, device)
        requirements = [Requirement.from_proto(r) for r in opened.statistics]
        self.collector = StatisticsCollector(requirements, self.geometry.num_layers, self.cache)
        self.stats = SessionStats(peak_lengths=[0] * self.geometry.num_layers)
        self._next_position = 0
        self._pending_positions: list[torch.Tensor] = []
        self._sequence = 0
        self._decode_steps = 0
        self._closed = False

    # -- forwards -------------------------------------------------------------------------
    def prefill(self, token_ids: torch.Tensor, on_block: Callable[[int], None] | None = None) -> torch.Tensor:
        """Feeds prompt tokens (n,) block by block; returns the logits (vocab,) after the last."""
        if token_ids.numel() == 0:
            raise ValueError("the prompt has no tokens")
        logits = None
        for chunk in torch.split(token_ids, self.settings.block_size):
            self.collector.start_period(chunk.numel())
            logits = self._forward(chunk)
            self._end_period(pb.PHASE_PREFILL)
            if on_block is not None:
                on_block(chunk.numel())
        return logits

    def decode(self, token_id: int) -> torch.Tensor:
        """Feeds one generated token; returns the logits of the next position."""
        if self._decode_steps == 0:
            self.collector.start_period(self.settings.block_size)
        logits = self._forward(torch.tensor([token_id]))
        self._decode_steps += 1
        if self._decode_steps == self.settings.block_size:
            self._decode_steps = 0
            self._end_period(pb.PHASE_DECODE)
        return logits

    @torch.inference_mode()
    def _forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self._next_position, self._next_position + token_ids.numel(), device=self.device)
        self._next_position += token_ids.numel()
        self._pending_positions.append(positions)
        self.cache.append_positions(positions)
        if self.observer is not None:
            self.observer(positions, [self.cache.positions(layer) for layer in range(self.cache.num_layers)])
        # Absolute position ids: after eviction the cache length is not the position (RoPE).
        output = self.model(
            input_ids=token_ids.to(self.device)[None, :],
            position_ids=positions[None, :],
            past_key_values=self.cache.hf_cache,
            use_cache=True,
            logits_to_keep=1,
            **{COLLECTOR_KWARG: self.collector},
        )
        for layer in range(self.cache.num_layers):
            self.stats.peak_lengths[layer] = max(self.stats.peak_lengths[layer], self.cache.length(layer))
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.cache.kv_bytes())
        return output.logits[0, -1]

    # -- reports --------------------------------------------------------------------------
    def _end_period(self, phase: int) -> None:
        over_budget = any(self.cache.length(layer) > budget for layer, budget in enumerate(self.layer_budgets))
        if self.report_every_block or over_budget:
            self._report(phase)

    def _report(self, phase: int) -> None:
        request = self._build_report(phase)
        started = time.perf_counter()
        response = self.manager.report_block(request)
        self.stats.manager_seconds += time.perf_counter() - started
        self.stats.reports += 1
        self.stats.report_bytes += request.ByteSize()
        self._pending_positions.clear()
        for keep in response.keeps:
            mask = wire.decode_bits(keep.keep, f"keeps[{keep.layer}].keep")
            self.cache.apply_keep(keep.layer, torch.from_numpy(mask))
        self.layer_budgets = list(response.layer_budgets)

    @torch.inference_mode()
    def _build_report(self, phase: int) -> pb.ReportBlockRequest:
        self._sequence += 1
        positions = torch.cat(self._pending_positions).cpu().numpy()
        layers = []
        for layer in range(self.cache.num_layers):
            keys, values = self.cache.keys_values(layer)
            tensors = [self._to_wire(t) for t in self.collector.layer_statistics(layer, keys, values)]
            layers.append(pb.LayerStatistics(layer=layer, cache_length=self.cache.length(layer), values=tensors))
        return pb.ReportBlockRequest(session_id=self.session_id, sequence=self._sequence, phase=phase,
                                     positions=wire.encode(positions.astype(np.int64)), layers=layers)

    def _to_wire(self, statistic: torch.Tensor) -> tensor_pb2.Tensor:
        if self.wire_dtype == np.float16:
            statistic = statistic.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        return wire.encode(statistic.cpu().numpy().astype(self.wire_dtype))

    def close(self) -> pb.CloseSessionResponse | None:
        if self._closed:
            return None
        self._closed = True
        return self.manager.close_session(pb.CloseSessionRequest(session_id=self.session_id))
