"""Test doubles and references for the worker: a manager with scripted decisions, a masked
full-cache forward that replays what the pruned cache let every query see."""

from __future__ import annotations

import copy

import numpy as np
import torch
from transformers import AttentionInterface

from kvevict import wire
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2


class RandomKeepManager:
    """Keeps a random subset of each layer's cache, with a different budget per layer.

    Exercises the worker's pruning and per-layer masks independently of any policy. It also
    checks what the worker sends: one tensor per negotiated statistic of the right shape.
    """

    def __init__(self, layer_budgets: list[int], seed: int = 0) -> None:
        self.layer_budgets = layer_budgets
        self.rng = np.random.default_rng(seed)
        self.statistics = [pb.StatisticRequirement(statistic=pb.STATISTIC_ATTN_SUM),
                           pb.StatisticRequirement(statistic=pb.STATISTIC_VALUE_DEV_EXCLUDED, window=4,
                                                   reference=pb.REFERENCE_WINDOW_ATTENTION, pool_kernel=1)]
        self.reports: list[pb.ReportBlockRequest] = []

    def open_session(self, request: pb.OpenSessionRequest) -> pb.OpenSessionResponse:
        assert request.geometry.num_layers == len(self.layer_budgets)
        self.geometry = request.geometry
        return pb.OpenSessionResponse(session_id="scripted", statistics=self.statistics, report_every_block=True,
                                      layer_budgets=self.layer_budgets, statistics_dtype=tensor_pb2.DTYPE_FLOAT32)

    def report_block(self, request: pb.ReportBlockRequest) -> pb.ReportBlockResponse:
        self.reports.append(request)
        keeps = []
        for stats, budget in zip(request.layers, self.layer_budgets):
            for i, tensor in enumerate(stats.values):
                values = wire.decode(tensor, f"layers[{stats.layer}].values[{i}]")
                assert values.shape == (self.geometry.num_kv_heads, stats.cache_length)
                assert np.isfinite(values).all()
            if stats.cache_length <= budget:
                continue
            mask = np.zeros((self.geometry.num_kv_heads, stats.cache_length), dtype=bool)
            for head in range(self.geometry.num_kv_heads):
                mask[head, self.rng.choice(stats.cache_length, size=budget, replace=False)] = True
            keeps.append(pb.LayerKeep(layer=stats.layer, cache_length=stats.cache_length, kept_tokens=budget,
                                      keep=wire.encode_bits(mask)))
        return pb.ReportBlockResponse(sequence=request.sequence, keeps=keeps, layer_budgets=self.layer_budgets)

    def close_session(self, request: pb.CloseSessionRequest) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(reports=len(self.reports))


class VisibilityTrace:
    """Records, for every forward, which cached positions each layer and KV head held."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def __call__(self, query_positions: torch.Tensor, layer_positions: list[torch.Tensor]) -> None:
        self.steps.append((query_positions.clone(), [p.clone() for p in layer_positions]))

    def masks(self, total: int) -> list[torch.Tensor]:
        """Per layer, a boolean (Hkv, total, total): may query position t see token p."""
        num_layers = len(self.steps[0][1])
        num_kv_heads = self.steps[0][1][0].shape[0]
        masks = [torch.zeros(num_kv_heads, total, total, dtype=torch.bool) for _ in range(num_layers)]
        for queries, layers in self.steps:
            for layer, positions in enumerate(layers):
                for head in range(num_kv_heads):
                    rows, cols = torch.meshgrid(queries, positions[head], indexing="ij")
                    masks[layer][head, rows, cols] = True
        causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
        return [m & causal for m in masks]


_REFERENCE_MASKS: dict[int, torch.Tensor] = {}


def _masked_eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """Plain eager attention of a full sequence with a per-layer, per-KV-head visibility mask
    (and the layer's own sliding window and logit soft-capping, as transformers' eager has)."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    visible = _REFERENCE_MASKS[module.layer_idx].repeat_interleave(group, dim=0)[None]
    if sliding_window is not None:  # query t sees key p when t - window < p (positions are indices here)
        index = torch.arange(visible.shape[-1])
        visible = visible & (index[None, :] > index[:, None] - sliding_window)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvevict_test_masked", _masked_eager_attention)


def masked_full_forward(model, token_ids: list[int], masks: list[torch.Tensor]) -> torch.Tensor:
    """Logits (T, vocab) of one full-sequence forward where layer l sees only masks[l]."""
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("kvevict_test_masked")
    _REFERENCE_MASKS.clear()
    _REFERENCE_MASKS.update(dict(enumerate(masks)))
    with torch.no_grad():
        ids = torch.tensor([token_ids])
        return reference(input_ids=ids, position_ids=torch.arange(len(token_ids))[None]).logits[0]
