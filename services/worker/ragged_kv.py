"""A KV cache whose every KV head holds its own number of tokens, evicted entries really freed.

`PrunableCache` keeps (1, Hkv, L, d) per layer: every head of a layer the same L. Per-head budgets
(kvevict.cache_manager.head_budgets) give each (layer, KV head) its own count; masking the extra
tokens, as kvpress does, saves no memory. `RaggedKV` stores, per layer, each head's own tokens in
one of three layouts (docs/HEAD_BUDGETS.md, "The ragged cache: layout and cost", has the measured
choice):

* `per_head`: one (capacity, d) tensor per head, grown with a little headroom (amortised appends);
* `packed` (the default): one (capacity, d) buffer for the layer, each head a segment
  [start, start + capacity) of it, every segment with the same headroom, the whole layer repacked
  when they fill up (the layout of varlen kernels); consecutive heads holding as many tokens are
  attended in one SDPA call (a run);
* `padded16` / `padded64`: one (Hkv, Lpad, d) tensor, Lpad the longest head rounded up to the
  bucket, shorter heads padded (one SDPA call with a mask).

Appends are the same for every head (each new token enters every head); keeps differ per head.
`ragged_attention` is exact attention over any layout: GQA, causal inside the new block, optional
sliding window, and the float32 probabilities a statistics collector asks for.

    >>> import torch
    >>> cache = RaggedKV(num_layers=1, num_kv_heads=2, head_dim=4)  # layout="packed"
    >>> cache.append(0, torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.arange(3))
    >>> cache.keep(0, [torch.tensor([True, False, True]), torch.tensor([False, False, True])])
    >>> cache.lengths(0), cache.positions(0, 1).tolist()
    ([2, 1], [2])
    >>> out, _ = ragged_attention(torch.randn(1, 6, 1, 4), cache, 0, block=0)
    >>> tuple(out.shape)
    (1, 1, 6, 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("per_head", "packed", "padded16", "padded64")
# The only layout that met both targets (decode within 20% of the rectangular cache, bytes within
# 5% of the kept entries) in every measured shape and budget pattern (benchmarks/ragged_attention.py).
DEFAULT_LAYOUT = "packed"
# Headroom after a reallocation: max(MIN_HEADROOM, n // HEADROOM_DIVISOR) tokens. A head of n
# tokens then reallocates once per n/64 appends (copying n: 64 token copies per append, amortised)
# and holds at most 1/64 + 8/n slack (per_head: 1.8% measured at 1024 per head on average with
# 0.2x heads at 205; packed gives every head the layer's mean share: 1.5%).
MIN_HEADROOM = 8
HEADROOM_DIVISOR = 64


def headroom(tokens: int) -> int:
    """Spare token slots a head gets when (re)allocated to hold `tokens`."""
    return max(MIN_HEADROOM, tokens // HEADROOM_DIVISOR)


def _full_mask(mask: torch.Tensor, length: int, head: int) -> torch.Tensor:
    """A head's keep mask over its `length` tokens: columns after the mask's end stay."""
    mask = torch.as_tensor(mask, dtype=torch.bool).flatten().cpu()
    if mask.numel() > length:
        raise ValueError(f"keep mask of KV head {head} covers {mask.numel()} tokens, the head holds {length}")
    if mask.numel() < length:
        mask = torch.cat([mask, mask.new_ones(length - mask.numel())])
    return mask


class RaggedLayer:
    """One layer's keys, values and absolute positions, with a length per KV head."""

    layout = ""
    runs_only = True  # attended run by run (runs, run_kv); PaddedLayer: in one call over its padding

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, torch.device(device)
        self._len = [0] * num_kv_heads

    # -- what every layout provides --------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Appends q new tokens to every head: keys/values (1, Hkv, q, d) or (Hkv, q, d), positions (q,)."""
        raise NotImplementedError

    def keep(self, masks: Sequence[torch.Tensor]) -> None:
        """Keeps, in each head h, the columns where masks[h] (bool, at most that head's length) is
        True, in order; columns after masks[h]'s end (appended since it was decided) stay."""
        raise NotImplementedError

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head h's keys (L_h, d), values (L_h, d) and positions (L_h,): views, not copies."""
        raise NotImplementedError

    def runs(self) -> list[tuple[int, int]]:
        """(first head, count) of consecutive heads one SDPA call can take together (run_kv)."""
        return [(h, 1) for h in range(self.num_kv_heads)]

    def run_kv(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (count, 1, L, d) of heads [first, first + count) of one run: views."""
        k, v, _ = self.head(first)
        return k[None, None], v[None, None]

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values now, capacity slack and padding included."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def lengths(self) -> list[int]:
        """Tokens held per KV head."""
        return list(self._len)

    def kept_bytes(self) -> int:
        """Bytes the held keys and values themselves take (no slack): the floor of kv_bytes."""
        return sum(self._len) * 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def to_rectangular(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (1, Hkv, Lmax, d), positions (Hkv, Lmax) (-1 in padding) and valid (Hkv, Lmax):
        each head's tokens left-aligned, zeros after them. With equal lengths: PrunableCache's layout."""
        longest = max(self._len, default=0)
        keys = torch.zeros(1, self.num_kv_heads, longest, self.head_dim, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        positions = torch.full((self.num_kv_heads, longest), -1, dtype=torch.long, device=self.device)
        for h in range(self.num_kv_heads):
            k, v, p = self.head(h)
            keys[0, h, : k.shape[0]], values[0, h, : v.shape[0]], positions[h, : p.shape[0]] = k, v, p
        lengths = torch.tensor(self._len, device=self.device)
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        return keys, values, positions, valid

    def _check_block(self, keys: torch.Tensor, values: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys = keys[0] if keys.dim() == 4 else keys
        values = values[0] if values.dim() == 4 else values
        if keys.shape[0] != self.num_kv_heads or keys.shape[-1] != self.head_dim or values.shape != keys.shape:
            raise ValueError(f"block keys {tuple(keys.shape)} / values {tuple(values.shape)}, the layer holds "
                             f"({self.num_kv_heads}, q, {self.head_dim})")
        positions = torch.as_tensor(positions, dtype=torch.long, device=self.device).flatten()
        if positions.numel() != keys.shape[1]:
            raise ValueError(f"{positions.numel()} positions for a block of {keys.shape[1]} tokens")
        return keys.to(self.dtype), values.to(self.dtype), positions


class PerHeadLayer(RaggedLayer):
    """Layout (a): one (capacity, d) tensor per head."""

    layout = "per_head"

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_kv_heads, head_dim, dtype, device)
        self._k = [self._alloc(0) for _ in range(num_kv_heads)]
        self._v = [self._alloc(0) for _ in range(num_kv_heads)]
        self._p = [torch.empty(0, dtype=torch.long, device=self.device) for _ in range(num_kv_heads)]

    def _alloc(self, capacity: int) -> torch.Tensor:
        return torch.empty(capacity, self.head_dim, dtype=self.dtype, device=self.device)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        keys, values, positions = self._check_block(keys, values, positions)
        q = keys.shape[1]
        for h in range(self.num_kv_heads):
            n = self._len[h]
            if n + q > self._k[h].shape[0]:
                capacity = n + q + headroom(n + q)
                k, v, p = self._alloc(capacity), self._alloc(capacity), self._p[h].new_empty(capacity)
                k[:n], v[:n], p[:n] = self._k[h][:n], self._v[h][:n], self._p[h][:n]
                self._k[h], self._v[h], self._p[h] = k, v, p
            self._k[h][n : n + q], self._v[h][n : n + q], self._p[h][n : n + q] = keys[h], values[h], positions
            self._len[h] = n + q

    def keep(self, masks: Sequence[torch.Tensor]) -> None:
        if len(masks) != self.num_kv_heads:
            raise ValueError(f"{len(masks)} keep masks for {self.num_kv_heads} KV heads")
        for h in range(self.num_kv_heads):
            index = _full_mask(masks[h], self._len[h], h).nonzero().flatten().to(self.device)
            n = index.numel()
            # New tensors: the evicted rows' memory goes back to the allocator now.
            k, v, p = self._alloc(n + headroom(n)), self._alloc(n + headroom(n)), self._p[h].new_empty(n + headroom(n))
            torch.index_select(self._k[h], 0, index, out=k[:n])
            torch.index_select(self._v[h], 0, index, out=v[:n])
            torch.index_select(self._p[h], 0, index, out=p[:n])
            self._k[h], self._v[h], self._p[h], self._len[h] = k, v, p, n

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._len[h]
        return self._k[h][:n], self._v[h][:n], self._p[h][:n]

    def run_kv(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self._len[first]
        return self._k[first][None, None].narrow(2, 0, n), self._v[first][None, None].narrow(2, 0, n)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)


class PackedLayer(RaggedLayer):
    """Layout (b): one (capacity, d) buffer, head h the segment [start_h, start_h + capacity_h)."""

    layout = "packed"

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(num_kv_heads, head_dim, dtype, device)
        self._start, self._cap = [0] * num_kv_heads, [0] * num_kv_heads
        self._k = torch.empty(0, head_dim, dtype=dtype, device=self.device)
        self._v = torch.empty_like(self._k)
        self._p = torch.empty(0, dtype=torch.long, device=self.device)
        self._runs = [(0, num_kv_heads)] if num_kv_heads else []

    def _repack(self, source: torch.Tensor, counts: list[int], extra: int) -> None:
        """New buffers holding source rows (buffer indices, heads in order; counts[h] of head h),
        each segment with room for `extra` more plus headroom: one gather per tensor."""
        # Every head appends every token, so every segment gets the same headroom, the layer's
        # share per head: all fill up at the same step, one repack per `room` appends (a
        # per-head headroom would repack the whole layer whenever the shortest head fills up).
        room = headroom((sum(counts) + extra * len(counts)) // max(1, len(counts)))
        caps = [n + extra + room for n in counts]
        starts = [0] * self.num_kv_heads
        for h in range(1, self.num_kv_heads):
            starts[h] = starts[h - 1] + caps[h - 1]
        total = starts[-1] + caps[-1] if caps else 0
        target = torch.cat([torch.arange(s, s + n, device=self.device) for s, n in zip(starts, counts)])
        k = torch.empty(total, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        p = torch.empty(total, dtype=torch.long, device=self.device)
        k.index_copy_(0, target, self._k.index_select(0, source))
        v.index_copy_(0, target, self._v.index_select(0, source))
        p.index_copy_(0, target, self._p.index_select(0, source))
        self._k, self._v, self._p, self._start, self._cap, self._len = k, v, p, starts, caps, list(counts)
        # Runs of consecutive heads with equal counts (so equal segments): appends keep them equal.
        self._runs = []
        for h, n in enumerate(counts):
            if self._runs and counts[self._runs[-1][0]] == n:
                self._runs[-1] = (self._runs[-1][0], self._runs[-1][1] + 1)
            else:
                self._runs.append((h, 1))

    def _held(self) -> torch.Tensor:
        """Buffer indices of every held token, head by head."""
        return torch.cat([torch.arange(s, s + n, device=self.device) for s, n in zip(self._start, self._len)])

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        keys, values, positions = self._check_block(keys, values, positions)
        q = keys.shape[1]
        if any(n + q > c for n, c in zip(self._len, self._cap)):
            self._repack(self._held(), self._len, q)
        ends = torch.tensor([s + n for s, n in zip(self._start, self._len)], device=self.device)
        target = (ends[:, None] + torch.arange(q, device=self.device)[None, :]).flatten()
        self._k.index_copy_(0, target, keys.reshape(-1, self.head_dim))
        self._v.index_copy_(0, target, values.reshape(-1, self.head_dim))
        self._p.index_copy_(0, target, positions.repeat(self.num_kv_heads))
        self._len = [n + q for n in self._len]

    def keep(self, masks: Sequence[torch.Tensor]) -> None:
        if len(masks) != self.num_kv_heads:
            raise ValueError(f"{len(masks)} keep masks for {self.num_kv_heads} KV heads")
        index, counts = [], []
        for h in range(self.num_kv_heads):
            kept = _full_mask(masks[h], self._len[h], h).nonzero().flatten()
            index.append(kept + self._start[h])
            counts.append(kept.numel())
        self._repack(torch.cat(index).to(self.device), counts, 0)

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, n = self._start[h], self._len[h]
        return self._k[s : s + n], self._v[s : s + n], self._p[s : s + n]

    def runs(self) -> list[tuple[int, int]]:
        return self._runs

    def run_kv(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Heads of a run hold as many tokens in segments as long: one strided (count, 1, L, d) view.
        n, cap, d = self._len[first], self._cap[first], self.head_dim
        size, stride, offset = (count, 1, n, d), (cap * d, cap * d, d, 1), self._start[first] * d
        return self._k.as_strided(size, stride, offset), self._v.as_strided(size, stride, offset)

    def kv_bytes(self) -> int:
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


class PaddedLayer(RaggedLayer):
    """Layout (c): one (Hkv, Lpad, d) tensor, Lpad the longest head rounded up to `bucket`; each
    head's tokens left-aligned, the padding zeros (finite, so masked columns contribute 0)."""

    runs_only = False

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", bucket: int = 16) -> None:
        super().__init__(num_kv_heads, head_dim, dtype, device)
        self.bucket, self.layout = bucket, f"padded{bucket}"
        self._k = torch.zeros(num_kv_heads, 0, head_dim, dtype=dtype, device=self.device)
        self._v = torch.zeros_like(self._k)
        self._p = torch.full((num_kv_heads, 0), -1, dtype=torch.long, device=self.device)

    def _padded(self, tokens: int) -> int:
        return -(-tokens // self.bucket) * self.bucket

    def _resize(self, capacity: int, columns: int) -> None:
        k = self._k.new_zeros(self.num_kv_heads, capacity, self.head_dim)
        v, p = torch.zeros_like(k), self._p.new_full((self.num_kv_heads, capacity), -1)
        k[:, :columns], v[:, :columns], p[:, :columns] = (self._k[:, :columns], self._v[:, :columns],
                                                         self._p[:, :columns])
        self._k, self._v, self._p = k, v, p

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        keys, values, positions = self._check_block(keys, values, positions)
        q = keys.shape[1]
        if max(self._len, default=0) + q > self._k.shape[1]:
            self._resize(self._padded(max(self._len) + q), max(self._len, default=0))
        lengths = torch.tensor(self._len, device=self.device)
        column = lengths[:, None] + torch.arange(q, device=self.device)[None, :]  # (Hkv, q): per-head offsets
        self._k.scatter_(1, column[:, :, None].expand(-1, -1, self.head_dim), keys)
        self._v.scatter_(1, column[:, :, None].expand(-1, -1, self.head_dim), values)
        self._p.scatter_(1, column, positions[None, :].expand(self.num_kv_heads, -1))
        self._len = [n + q for n in self._len]

    def keep(self, masks: Sequence[torch.Tensor]) -> None:
        if len(masks) != self.num_kv_heads:
            raise ValueError(f"{len(masks)} keep masks for {self.num_kv_heads} KV heads")
        index = [_full_mask(masks[h], self._len[h], h).nonzero().flatten().to(self.device)
                 for h in range(self.num_kv_heads)]
        counts = [i.numel() for i in index]
        k = self._k.new_zeros(self.num_kv_heads, self._padded(max(counts, default=0)), self.head_dim)
        v, p = torch.zeros_like(k), self._p.new_full((self.num_kv_heads, k.shape[1]), -1)
        for h, i in enumerate(index):
            k[h, : counts[h]], v[h, : counts[h]], p[h, : counts[h]] = self._k[h, i], self._v[h, i], self._p[h, i]
        self._k, self._v, self._p, self._len = k, v, p, counts

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self._len[h]
        return self._k[h, :n], self._v[h, :n], self._p[h, :n]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (Hkv, Lpad, d) and positions (Hkv, Lpad) as stored (padding included)."""
        return self._k, self._v, self._p

    def kv_bytes(self) -> int:
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


def make_layer(layout: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> RaggedLayer:
    """An empty layer in `layout` (one of LAYOUTS)."""
    if layout == "per_head":
        return PerHeadLayer(num_kv_heads, head_dim, dtype, device)
    if layout == "packed":
        return PackedLayer(num_kv_heads, head_dim, dtype, device)
    if layout.startswith("padded") and layout[len("padded"):].isdigit() and int(layout[len("padded"):]) > 0:
        return PaddedLayer(num_kv_heads, head_dim, dtype, device, bucket=int(layout[len("padded"):]))
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (or paddedN), got {layout!r}")


class RaggedKV:
    """Every layer's RaggedLayer: keys and values with a length per (layer, KV head)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, layout: str = DEFAULT_LAYOUT,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.layout, self.num_kv_heads, self.head_dim = layout, num_kv_heads, head_dim
        self.layers = [make_layer(layout, num_kv_heads, head_dim, dtype, device) for _ in range(num_layers)]

    @classmethod
    def from_rectangular(cls, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         positions: Sequence[torch.Tensor], layout: str = DEFAULT_LAYOUT,
                         keep: Sequence[Sequence[torch.Tensor]] | None = None) -> RaggedKV:
        """From PrunableCache's layout: per layer keys/values (1, Hkv, L, d) and positions (Hkv, L)
        (or (L,)), optionally keeping keep[layer][h] of each head (as `keep`)."""
        first = keys[0]
        cache = cls(len(keys), first.shape[1], first.shape[-1], layout, first.dtype, first.device)
        for layer, (k, v, p) in enumerate(zip(keys, values, positions)):
            p = torch.as_tensor(p, dtype=torch.long, device=k.device)
            p = p.expand(k.shape[1], -1) if p.dim() == 1 else p
            target = cache.layers[layer]
            target.append(k, v, p[0])
            # After eviction a rectangular cache's heads hold different tokens: each its own positions.
            for h in range(k.shape[1]):
                target.head(h)[2].copy_(p[h])
            if keep is not None:
                target.keep(keep[layer])
        return cache

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Appends a block (1, Hkv, q, d) at `positions` (q,) to every head of `layer`."""
        self.layers[layer].append(keys, values, positions)

    def keep(self, layer: int, masks: Sequence[torch.Tensor]) -> None:
        """RaggedLayer.keep on `layer`."""
        self.layers[layer].keep(masks)

    def lengths(self, layer: int) -> list[int]:
        """Tokens held per KV head of `layer`."""
        return self.layers[layer].lengths()

    def positions(self, layer: int, head: int) -> torch.Tensor:
        """Absolute positions (L_h,) of head `head` of `layer`, in cache order."""
        return self.layers[layer].head(head)[2]

    def kv_bytes(self) -> int:
        """Bytes allocated for every layer's keys and values, slack and padding included."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kept_bytes(self) -> int:
        """Bytes of the held entries alone."""
        return sum(layer.kept_bytes() for layer in self.layers)

    def to_rectangular(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """RaggedLayer.to_rectangular of `layer`."""
        return self.layers[layer].to_rectangular()


def _visible(length: int, q_len: int, block: int, key_pos: torch.Tensor, query_pos: torch.Tensor | None,
             window: int) -> torch.Tensor | None:
    """Boolean (q, L) visibility in one head, None when everything is visible: every older cached
    token, causal inside the block (its `block` tokens are the head's last), the sliding window by
    absolute positions. block = 0: the queries are not in the cache and see all of it."""
    if not window and (block == 0 or q_len == 1):
        return None
    key_index = torch.arange(length, device=key_pos.device)
    if block:
        query_index = torch.arange(length - q_len, length, device=key_pos.device)  # the block's last q
        visible = key_index[None, :] <= query_index[:, None]
    else:
        visible = torch.ones(q_len, length, dtype=torch.bool, device=key_pos.device)
    if window:
        visible = visible & (key_pos[None, :] > query_pos[:, None] - window)
    return visible


def _query_positions(layer: RaggedLayer, q_len: int, block: int, query_positions: torch.Tensor | None,
                     window: int) -> torch.Tensor | None:
    if not window:
        return None
    if query_positions is not None:
        return torch.as_tensor(query_positions, dtype=torch.long, device=layer.device).flatten()[-q_len:]
    if not block:
        raise ValueError("a sliding window over queries outside the cache (block=0) needs query_positions")
    # Every head appended the block: its last positions are the queries'.
    return layer.head(0)[2][-q_len:]


def ragged_attention(
    query: torch.Tensor,
    store: RaggedKV,
    layer: int,
    scaling: float | None = None,
    sliding_window: int | None = None,
    block: int | None = None,
    query_positions: torch.Tensor | None = None,
    softcap: float | None = None,
    probabilities_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact attention of query (1, Hq, q, d) over layer `layer` of `store`, Hq = G x Hkv.

    `block`: how many of each head's last tokens are the queries' own block (default q: the block
    was appended, causal inside it); 0 for queries outside the cache (they see every cached token).
    `sliding_window`: keys at positions <= query position - window are invisible (positions from
    the cache's last `block`, or `query_positions`). A query that sees no key in a head (an empty
    head, or a window past every kept token) gets output 0 and all-zero probabilities there: no
    value to average, which is also what SDPA gives a fully masked row on CPU.
    `probabilities_from`: when not None, also returns the float32 probabilities of queries
    [probabilities_from, q) as (Hkv, G, q', Lmax), head h's in its first L_h columns, zeros after.
    Returns (output (1, q, Hq, d) in the query's dtype, probabilities or None).
    """
    cache = store.layers[layer]
    _, num_query_heads, q_len, head_dim = query.shape
    hkv = cache.num_kv_heads
    if query.shape[0] != 1 or num_query_heads % hkv or head_dim != cache.head_dim:
        raise ValueError(f"query {tuple(query.shape)} does not group over ({hkv}, L, {cache.head_dim})")
    group = num_query_heads // hkv
    scaling = head_dim**-0.5 if scaling is None else scaling
    block = q_len if block is None else block
    if block and block < q_len:
        raise ValueError(f"block of {block} cached tokens for {q_len} queries: the queries' block must be appended")
    lengths = cache._len
    if block and min(lengths) < block:
        raise ValueError(f"layer {layer} holds {lengths} tokens per head, fewer than the block of {block}")
    window = sliding_window or 0
    if q_len == 1 and not window and softcap is None and probabilities_from is None and cache.runs_only:
        return _decode_rows(query, cache, scaling), None
    query_pos = _query_positions(cache, q_len, block, query_positions, window)
    grouped = query[0].reshape(hkv, group, q_len, head_dim)

    probs = None
    if probabilities_from is not None or softcap is not None:
        first = 0 if softcap is not None else probabilities_from
        probs = _probabilities(grouped[:, :, first:], cache, scaling, block, query_pos, window, softcap, q_len)
    if softcap is not None:  # SDPA cannot soft-cap: the output from the float32 probabilities
        out = torch.stack([torch.einsum("gqk,kd->gqd", probs[h, :, :, : lengths[h]], cache.head(h)[1].float())
                           for h in range(hkv)])
        out = out.to(query.dtype)
        probs = None if probabilities_from is None else probs[:, :, probabilities_from:]
    elif not cache.runs_only:
        out = _attend_padded(grouped, cache, scaling, block, query_pos, window)
    else:
        out = _attend_heads(grouped, cache, scaling, block, query_pos, window)
    out = out.view(num_query_heads, q_len, head_dim)
    return (out.view(1, 1, num_query_heads, head_dim) if q_len == 1 else out.transpose(0, 1).contiguous()[None]), probs


def _decode_rows(query: torch.Tensor, cache: RaggedLayer, scaling: float) -> torch.Tensor:
    """A decode step (one query sees every cached token) as (1, 1, Hq, d), with as few operations
    as possible around the SDPA calls: on CPU each costs microseconds beside the attention itself.
    A KV head's G query heads are the rows of one product, one call per run of heads."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    _, num_query_heads, _, head_dim = query.shape
    hkv = cache.num_kv_heads
    rows = query.reshape(hkv, 1, num_query_heads // hkv, head_dim)
    runs, lengths = cache.runs(), cache._len
    if len(runs) == 1 and lengths[0]:  # an empty layer: zeros below (SDPA over no key is backend-dependent)
        return sdpa(rows, *cache.run_kv(0, hkv), scale=scaling).view(1, 1, num_query_heads, head_dim)
    outs = [sdpa(rows[first : first + count], *cache.run_kv(first, count), scale=scaling) if lengths[first]
            else rows.new_zeros(count, 1, rows.shape[2], head_dim) for first, count in runs]
    return torch.cat(outs).view(1, 1, num_query_heads, head_dim)


def _attend_heads(grouped: torch.Tensor, cache: RaggedLayer, scaling: float, block: int,
                  query_pos: torch.Tensor | None, window: int) -> torch.Tensor:
    """(Hkv, G, q, d): one SDPA call per run of heads over their own keys (layouts per_head, packed;
    a packed run is consecutive heads holding as many tokens, one head each in per_head)."""
    hkv, group, q_len, head_dim = grouped.shape
    sdpa = torch.nn.functional.scaled_dot_product_attention
    lengths = cache._len
    outs = []
    if not window and (block == 0 or q_len == 1):
        # Every key visible to every query: the G x q queries of a head are rows of one product,
        # no mask (this is the decode step).
        rows = grouped.reshape(hkv, 1, group * q_len, head_dim)
        for first, count in cache.runs():
            part = rows[first : first + count]
            outs.append(sdpa(part, *cache.run_kv(first, count), scale=scaling) if lengths[first]
                        else part.new_zeros(part.shape))
        return torch.cat(outs).view(hkv, group, q_len, head_dim)
    for first, count in cache.runs() if not window else [(h, 1) for h in range(hkv)]:
        part = grouped[first : first + count]
        if not lengths[first]:
            outs.append(part.new_zeros(part.shape))
            continue
        k, v = cache.run_kv(first, count)
        visible = _visible(lengths[first], q_len, block, cache.head(first)[2], query_pos, window)
        # enable_gqa, not broadcasting: a broadcast KV head sends SDPA to its slow math path.
        out = sdpa(part, k, v, attn_mask=visible[None, None], scale=scaling, enable_gqa=True)
        if window:  # rows the window leaves blind: 0, as in _attend_padded
            out = out.masked_fill(~visible.any(dim=-1)[None, None, :, None], 0.0)
        outs.append(out)
    return torch.cat(outs)


def _attend_padded(grouped: torch.Tensor, cache: PaddedLayer, scaling: float, block: int,
                   query_pos: torch.Tensor | None, window: int) -> torch.Tensor:
    """(Hkv, G, q, d): one SDPA call over the padded (Hkv, Lpad, d), padding masked per head."""
    hkv, group, q_len, head_dim = grouped.shape
    keys, values, positions = cache.padded()
    lengths = torch.tensor(cache.lengths(), device=keys.device)
    column = torch.arange(keys.shape[1], device=keys.device)
    if block:  # query i of the block sits at column L_h - q + i of head h
        last = lengths[:, None] - q_len + torch.arange(q_len, device=keys.device)[None, :]
    else:
        last = (lengths - 1)[:, None].expand(hkv, q_len)
    visible = column[None, None, :] <= last[:, :, None]  # (Hkv, q, Lpad)
    if window:
        visible = visible & (positions[:, None, :] > query_pos[None, :, None] - window)
    # Batch = KV head; decode: its G query heads are rows of one product, the mask broadcast over them.
    if q_len == 1:
        out = torch.nn.functional.scaled_dot_product_attention(
            grouped.reshape(hkv, 1, group, head_dim), keys[:, None], values[:, None], attn_mask=visible[:, None],
            scale=scaling).view(hkv, group, 1, head_dim)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(grouped, keys[:, None], values[:, None],
                                                               attn_mask=visible[:, None], scale=scaling,
                                                               enable_gqa=True)
    if window or int(lengths.min()) == 0:
        # Rows that see no key: 0 by definition (SDPA's answer for them depends on the backend).
        blind = ~visible.any(dim=-1)  # (Hkv, q)
        out = out.masked_fill(blind[:, None, :, None], 0.0)
    return out


def _probabilities(grouped: torch.Tensor, cache: RaggedLayer, scaling: float, block: int,
                   query_pos: torch.Tensor | None, window: int, softcap: float | None,
                   q_len: int) -> torch.Tensor:
    """float32 probabilities (Hkv, G, q', Lmax) of the last q' of the block's q queries."""
    hkv, group, q_sub, _ = grouped.shape
    lengths = cache.lengths()
    probs = torch.zeros(hkv, group, q_sub, max(lengths, default=0), dtype=torch.float32, device=grouped.device)
    for h in range(hkv):
        k, _, p = cache.head(h)
        if k.shape[0] == 0:
            continue
        scores = torch.einsum("gqd,kd->gqk", grouped[h].float(), k.float()) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = _visible(k.shape[0], q_len, block, p, query_pos, window)
        if visible is not None:
            scores = scores.masked_fill(~visible[q_len - q_sub :][None], float("-inf"))
        # A row with no visible key has probabilities 0 (softmax would give NaN).
        seen = torch.isfinite(scores).any(dim=-1, keepdim=True)
        probs[h, :, :, : k.shape[0]] = torch.softmax(scores, dim=-1).where(seen, 0.0)
    return probs
