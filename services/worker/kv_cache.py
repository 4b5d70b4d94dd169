"""A transformers `DynamicCache` that can be pruned per layer and KV head.

Each layer keeps, beside its keys and values, the absolute positions of its cached tokens
(Hkv, L): kept tokens keep their relative order, which is what keeps the manager's per-token
state aligned with this cache without sending positions back. Sliding-window layers drop the
tokens no later query can see (the rule of `kvevict.cache_manager.sliding`, which the manager
applies to its own state).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import DynamicCache

from kvevict.cache_manager.sliding import droppable
from kvevict.worker.statistics import PositionSource


class CacheListener(Protocol):
    def columns_kept(self, layer: int, index: torch.Tensor, length: int, positions: torch.Tensor) -> None:
        """Layer `layer` of `length` tokens keeps columns `index` (Hkv, K), at `positions` (Hkv, K)."""


class PrunableCache(PositionSource):
    """The KV cache of one sequence, with per-layer absolute positions and keep-mask pruning."""

    def __init__(self, num_layers: int, num_kv_heads: int, device: torch.device | str = "cpu",
                 sliding_windows: Sequence[int] = (), hf_cache: DynamicCache | None = None) -> None:
        # No config: every layer is a plain DynamicLayer (a sliding-window layer would crop itself
        # behind our back; windows are applied in the attention mask and by drop_unseen instead).
        # `hf_cache`: an empty DynamicCache to fill instead (kvevict.worker.evicting_cache).
        self.hf_cache = DynamicCache() if hf_cache is None else hf_cache
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.sliding_windows = list(sliding_windows) or [0] * num_layers  # 0 = full attention
        if len(self.sliding_windows) != num_layers:
            raise ValueError(f"{len(self.sliding_windows)} sliding windows for {num_layers} layers")
        self._positions = [torch.empty(num_kv_heads, 0, dtype=torch.long, device=device) for _ in range(num_layers)]
        self._dropped = [0] * num_layers  # tokens per KV head that left a layer's sliding window
        self.tokens_seen = 0
        # Told of every column a layer keeps (CacheListener), e.g. the statistics collector.
        self.listener: CacheListener | None = None

    def append_positions(self, positions: torch.Tensor) -> None:
        """Declares the absolute positions (q,) of the block about to be forwarded."""
        positions = positions.to(self._positions[0].device)
        block = positions.unsqueeze(0).expand(self.num_kv_heads, -1)
        self._positions = [torch.cat([p, block], dim=1) for p in self._positions]
        self.tokens_seen += positions.numel()

    def positions(self, layer: int) -> torch.Tensor:
        return self._positions[layer]

    def window(self, layer: int) -> int:
        """The layer's sliding attention window in tokens, 0 for full attention."""
        return self.sliding_windows[layer]

    def length(self, layer: int) -> int:
        """Tokens per KV head cached in `layer`."""
        return self._positions[layer].shape[1]

    def evicted(self, layer: int) -> int:
        """Tokens per KV head eviction removed from `layer` (not those that left its window)."""
        return self.tokens_seen - self._dropped[layer] - self.length(layer)

    def checkpoint(self) -> tuple:
        """What `restore` needs to undo later appends (tensors are only ever replaced, never
        written in place, so references suffice): speculative forwards such as lookahead."""
        return ([(entry.keys, entry.values) for entry in self.hf_cache.layers], list(self._positions),
                self.tokens_seen)

    def restore(self, checkpoint: tuple) -> None:
        """Back to the cache as `checkpoint` saw it."""
        tensors, positions, tokens_seen = checkpoint
        for entry, (keys, values) in zip(self.hf_cache.layers, tensors):
            entry.keys, entry.values = keys, values
        self._positions, self.tokens_seen = positions, tokens_seen

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.hf_cache.layers[layer]
        return entry.keys, entry.values

    def recent_keys(self, layer: int, count: int) -> torch.Tensor:
        """The last `count` keys of every head (Hkv, count, d): a block every head appended."""
        return self.hf_cache.layers[layer].keys[0, :, -count:]

    def check_geometry(self, head_dim: int) -> None:
        """Raises when the model cached other shapes than the geometry it was opened with."""
        for layer, entry in enumerate(self.hf_cache.layers):
            got = (entry.keys.shape[1], entry.keys.shape[-1]) if entry.keys is not None else None
            if got != (self.num_kv_heads, head_dim):
                raise ValueError(f"layer {layer} caches (KV heads, head dim) {got}, the geometry read from the "
                                 f"model config says ({self.num_kv_heads}, {head_dim}): this architecture's "
                                 "config is not understood (kvevict.worker.model_loader.geometry_of)")

    def unseen(self, last_position: int) -> list[int]:
        """Per layer, the leading tokens no query after `last_position` can see in any KV head."""
        return [droppable(p, last_position, w) for p, w in zip(self._positions, self.sliding_windows)]

    def drop_leading(self, counts: Sequence[int]) -> None:
        """Drops the first counts[l] tokens of every KV head of each layer l (see unseen)."""
        for layer, count in enumerate(counts):
            if count:
                if self.listener is not None:
                    length = self.length(layer)
                    kept = torch.arange(count, length, device=self._positions[layer].device)
                    self.listener.columns_kept(layer, kept.expand(self.num_kv_heads, -1), length,
                                               self._positions[layer][:, count:])
                self._positions[layer] = self._positions[layer][:, count:]
                entry = self.hf_cache.layers[layer]
                # Copies, so the dropped rows' memory is freed now, not at the next append.
                entry.keys = entry.keys[:, :, count:].contiguous()
                entry.values = entry.values[:, :, count:].contiguous()
                self._dropped[layer] += count

    def apply_keep(self, layer: int, keep: torch.Tensor) -> None:
        """Keeps the tokens of `keep` (Hkv, M) bool, the same count in every head, in order; the
        tokens after the first M (cached since the mask was decided) all stay."""
        length = self.length(layer)
        if keep.dim() != 2 or keep.shape[0] != self.num_kv_heads or keep.shape[1] > length:
            raise ValueError(f"keep mask of layer {layer} has shape {tuple(keep.shape)}, "
                             f"cache is ({self.num_kv_heads}, {length})")
        if keep.shape[1] < length:
            keep = torch.cat([keep, keep.new_ones(self.num_kv_heads, length - keep.shape[1])], dim=1)
        counts = keep.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"keep mask of layer {layer} keeps {counts.tolist()} tokens per head; must be equal")
        kept = int(counts[0])
        # nonzero is row-major: per head, ascending token index -> order is preserved.
        index = keep.to(self._positions[layer].device).nonzero()[:, 1].view(self.num_kv_heads, kept)
        positions = torch.gather(self._positions[layer], 1, index)
        if self.listener is not None:
            self.listener.columns_kept(layer, index, length, positions)
        self._positions[layer] = positions
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
        """Bytes transformers' own cache (DynamicCache(config=...)) would hold for the same tokens
        had nothing been evicted: every token seen, or in a sliding layer the last window - 1."""
        total = 0
        for entry, window in zip(self.hf_cache.layers, self.sliding_windows):
            if entry.keys is not None and entry.keys.numel():
                per_token = entry.keys.shape[1] * (entry.keys.shape[-1] * entry.keys.element_size()
                                                   + entry.values.shape[-1] * entry.values.element_size())
                total += per_token * (min(self.tokens_seen, window - 1) if window else self.tokens_seen)
        return total
