"""The KV cache of a per-head session: every (layer, KV head) holds its own number of tokens.

`PrunableCache` keeps every head of a layer at one length, so per-head budgets
(OpenSessionResponse.per_head_budgets) would have to mask tokens instead of freeing them.
`HeadPrunableCache` keeps the tokens in a `RaggedKV` (packed layout: one buffer per layer, a
segment per head), so an evicted entry's memory is really given back. It serves the same
`CacheSession` calls as `PrunableCache`; the model's `past_key_values` is a `DynamicCache` whose
layers only hand each forward's new keys and values to the store (`_StoreLayer`), and kvevict
attention reads the store itself (`RAGGED_KWARG` in the forward's kwargs).

Per-head sessions refuse sliding-window layers (the manager does), so nothing leaves a window.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvevict.worker.ragged_kv import RaggedKV
from kvevict.worker.statistics import PositionSource

# The forward kwarg through which kvevict attention finds a per-head session's store.
RAGGED_KWARG = "kvevict_ragged_cache"


class _StoreLayer(DynamicLayer):
    """A transformers cache layer that appends each forward's block to the store and returns the
    block alone: kvevict attention attends over the store, not over what update returns."""

    def __init__(self, owner: HeadPrunableCache, layer: int) -> None:
        super().__init__()
        self._owner, self._layer = owner, layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._owner.append_block(self._layer, key_states, value_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self._owner.tokens_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.tokens_seen + query_length, 0


class HeadPrunableCache(PositionSource):
    """One sequence's keys and values with a length per (layer, KV head), in a RaggedKV."""

    ragged = True

    def __init__(self, num_layers: int, num_kv_heads: int, device: torch.device | str = "cpu",
                 sliding_windows=(), hf_cache: DynamicCache | None = None) -> None:
        if any(sliding_windows):
            raise ValueError("per-head budgets do not support sliding-window layers")
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.device = torch.device(device)
        self.hf_cache = DynamicCache() if hf_cache is None else hf_cache
        self.hf_cache.layers[:] = [_StoreLayer(self, layer) for layer in range(num_layers)]
        self.store: RaggedKV | None = None  # made at the first block, when head size and dtype are known
        self._block: torch.Tensor | None = None  # positions (q,) of the forward under way
        self.tokens_seen = 0
        # Told of every layer's keeps (HeadStatisticsCollector.heads_kept): the period sums follow.
        self.listener = None

    # -- what CacheSession and the collector ask of a cache -------------------------------------
    def append_positions(self, positions: torch.Tensor) -> None:
        """Declares the absolute positions (q,) of the block about to be forwarded."""
        self._block = positions.to(self.device)
        self.tokens_seen += positions.numel()

    def append_block(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The forward's new keys/values (1, Hkv, q, d) for `layer`, at the declared positions."""
        if self._block is None or self._block.numel() != keys.shape[2]:
            raise ValueError(f"layer {layer} cached {keys.shape[2]} new tokens; the cache was told of "
                             f"{0 if self._block is None else self._block.numel()}")
        if self.store is None:
            self.store = RaggedKV(self.num_layers, keys.shape[1], keys.shape[-1], dtype=keys.dtype,
                                  device=keys.device)
        self.store.append(layer, keys, values, self._block)

    def head_lengths(self, layer: int) -> list[int]:
        """Tokens held by each KV head of `layer`."""
        return self.store.lengths(layer) if self.store is not None else [0] * self.num_kv_heads

    def head_positions(self, layer: int) -> list[torch.Tensor]:
        """Each KV head's absolute positions (L_h,), in cache order."""
        if self.store is None:
            return [torch.empty(0, dtype=torch.long, device=self.device) for _ in range(self.num_kv_heads)]
        return [self.store.positions(layer, h) for h in range(self.num_kv_heads)]

    def positions(self, layer: int) -> torch.Tensor:
        """(Hkv, Lmax) absolute positions, each head's left-aligned, -1 after its end."""
        rows = self.head_positions(layer)
        padded = torch.full((self.num_kv_heads, max((r.numel() for r in rows), default=0)), -1, dtype=torch.long,
                            device=self.device)
        for h, row in enumerate(rows):
            padded[h, : row.numel()] = row
        return padded

    def window(self, layer: int) -> int:
        return 0

    def length(self, layer: int) -> int:
        """The longest head of `layer` (the width of its left-aligned statistics)."""
        return max(self.head_lengths(layer), default=0)

    def total_length(self, layer: int) -> int:
        """Entries held in `layer`, summed over its KV heads."""
        return sum(self.head_lengths(layer))

    def evicted(self, layer: int) -> int:
        """Entries evicted from `layer`, summed over its KV heads."""
        return self.tokens_seen * self.num_kv_heads - self.total_length(layer)

    def unseen(self, last_position: int) -> list[int]:
        return [0] * self.num_layers

    def drop_leading(self, counts) -> None:
        if any(counts):
            raise ValueError("a per-head cache has no sliding-window layers to drop tokens from")

    def check_geometry(self, head_dim: int) -> None:
        if self.store is not None and (self.store.num_kv_heads, self.store.head_dim) != (self.num_kv_heads, head_dim):
            raise ValueError(f"the model cached (KV heads, head dim) ({self.store.num_kv_heads}, {self.store.head_dim}),"
                             f" the geometry read from the model config says ({self.num_kv_heads}, {head_dim})")

    def recent_keys(self, layer: int, count: int) -> torch.Tensor:
        """The last `count` keys of every head (Hkv, count, d): a block every head appended."""
        return torch.stack([self.store.layers[layer].head(h)[0][-count:] for h in range(self.num_kv_heads)])

    def checkpoint(self) -> tuple:
        """What `restore` needs to undo later appends: the lengths (appends only add at the end)."""
        return [self.head_lengths(layer) for layer in range(self.num_layers)], self.tokens_seen

    def restore(self, checkpoint: tuple) -> None:
        lengths, tokens_seen = checkpoint
        for layer, saved in enumerate(lengths):
            now = self.head_lengths(layer)
            if now != saved:
                self.store.keep(layer, [torch.arange(n) < s for n, s in zip(now, saved)])
        self.tokens_seen = tokens_seen

    def apply_head_keeps(self, layer: int, masks: list[torch.Tensor]) -> None:
        """Keeps, in each head h, the columns where masks[h] is True (columns after its end stay)."""
        if self.listener is not None:
            self.listener.heads_kept(layer, masks)
        self.store.keep(layer, masks)

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values now (the packed buffers' slack included)."""
        return self.store.kv_bytes() if self.store is not None else 0

    def kept_bytes(self) -> int:
        """Bytes of the held entries alone."""
        return self.store.kept_bytes() if self.store is not None else 0

    def full_cache_bytes(self) -> int:
        """Bytes a DynamicCache would hold for every token seen."""
        if self.store is None:
            return 0
        per_entry = 2 * self.store.head_dim * torch.empty((), dtype=self.store.layers[0].dtype).element_size()
        return per_entry * self.tokens_seen * self.num_kv_heads * self.num_layers
