"""A transformers `DynamicCache` that can be pruned per layer and KV head.

Each layer keeps, beside its keys and values, the absolute positions of its cached tokens
(Hkv, L): kept tokens keep their relative order, which is what keeps the manager's per-token
state aligned with this cache without sending positions back.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from kvevict.worker.statistics import PositionSource


class PrunableCache(PositionSource):
    """The KV cache of one sequence, with per-layer absolute positions and keep-mask pruning."""

    def __init__(self, num_layers: int, num_kv_heads: int, device: torch.device | str = "cpu") -> None:
        # No config: every layer is a plain DynamicLayer (a sliding-window layer would crop itself
        # behind our back; sliding windows are applied in the attention mask instead).
        self.hf_cache = DynamicCache()
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self._positions = [torch.empty(num_kv_heads, 0, dtype=torch.long, device=device) for _ in range(num_layers)]
        self.tokens_seen = 0

    def append_positions(self, positions: torch.Tensor) -> None:
        """Declares the absolute positions (q,) of the block about to be forwarded."""
        positions = positions.to(self._positions[0].device)
        block = positions.unsqueeze(0).expand(self.num_kv_heads, -1)
        self._positions = [torch.cat([p, block], dim=1) for p in self._positions]
        self.tokens_seen += positions.numel()

    def positions(self, layer: int) -> torch.Tensor:
        return self._positions[layer]

    def length(self, layer: int) -> int:
        """Tokens per KV head cached in `layer`."""
        return self._positions[layer].shape[1]

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.hf_cache.layers[layer]
        return entry.keys, entry.values

    def apply_keep(self, layer: int, keep: torch.Tensor) -> None:
        """Keeps the tokens of `keep` (Hkv, L) bool, the same count in every head, in order."""
        length = self.length(layer)
        if tuple(keep.shape) != (self.num_kv_heads, length):
            raise ValueError(f"keep mask of layer {layer} has shape {tuple(keep.shape)}, "
                             f"cache is ({self.num_kv_heads}, {length})")
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"keep mask of layer {layer} keeps {counts.tolist()} tokens per head; must be equal")
        kept = int(counts[0])
        # nonzero is row-major: per head, ascending token index -> order is preserved.
        index = keep.to(self._positions[layer].device).nonzero()[:, 1].view(self.num_kv_heads, kept)
        self._positions[layer] = torch.gather(self._positions[layer], 1, index)
        entry = self.hf_cache.layers[layer]
        gather_index = index.to(entry.keys.device)[None, :, :, None].expand(1, -1, -1, entry.keys.shape[-1])
        entry.keys = torch.gather(entry.keys, 2, gather_index)
        entry.values = torch.gather(entry.values, 2, gather_index.expand(-1, -1, -1, entry.values.shape[-1]))

    def kv_bytes(self) -> int:
        """Bytes held by keys and values of every layer now."""
        total = 0
        for entry in self.hf_cache.layers:
            if entry.keys is not None and entry.keys.numel():
                total += entry.keys.numel() * entry.keys.element_size()
                total += entry.values.numel() * entry.values.element_size()
        return total

    def full_cache_bytes(self) -> int:
        """Bytes the same cache would hold had nothing been evicted."""
        total = 0
        for entry in self.hf_cache.layers:
            if entry.keys is not None and entry.keys.numel():
                per_token = entry.keys.shape[1] * (entry.keys.shape[-1] * entry.keys.element_size()
                                                   + entry.values.shape[-1] * entry.values.element_size())
                total += per_token * self.tokens_seen
        return total
