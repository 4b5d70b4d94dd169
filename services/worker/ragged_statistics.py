"""The statistics collector of a per-head cache (kvevict.worker.ragged_cache).

Every head holds its own tokens, so each statistic is measured head by head, exactly as the
rectangular collector measures a layer of one KV head holding that head's tokens. The period
accumulators stay (Hkv, Lmax): head h's tokens in its first L_h columns, zeros after, which is
how ragged attention hands over probabilities, so the rectangular accumulation adds them as they
come; evictions realign them head by head (`heads_kept`).
"""

from __future__ import annotations

import torch

from kvevict.worker.statistics import StatisticsCollector, _LayerAccumulators, _grow_add


def _kept_rows(total: torch.Tensor | None, masks: list[torch.Tensor]) -> torch.Tensor | None:
    """An (Hkv, W) left-aligned accumulator after each head h keeps masks[h] of its columns
    (columns after the mask's end stay), left-aligned again."""
    if total is None:
        return None
    rows = []
    for h, mask in enumerate(masks):
        mask = mask.to(total.device)
        row, covered = total[h], min(mask.numel(), total.shape[1])  # columns past the row are zeros
        rows.append(torch.cat([row[:covered][mask[:covered]], row[mask.numel():]]))
    width = max((r.numel() for r in rows), default=0)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])


def _head_row(total: torch.Tensor | None, head: int, length: int, device: torch.device) -> torch.Tensor:
    """Head `head`'s first `length` columns of a left-aligned accumulator as (1, length)."""
    if total is None:
        return torch.zeros(1, length, device=device)
    row = total[head : head + 1, :length]
    return torch.nn.functional.pad(row, (0, length - row.shape[1]))


class HeadStatisticsCollector(StatisticsCollector):
    """StatisticsCollector over a HeadPrunableCache."""

    def heads_kept(self, layer: int, masks: list[torch.Tensor]) -> None:
        """Layer `layer`'s heads kept masks[h] of their columns: every accumulator follows."""
        acc = self._layers[layer]
        acc.attn_sum = _kept_rows(acc.attn_sum, masks)
        acc.attn_window = {window: _kept_rows(total, masks) for window, total in acc.attn_window.items()}
        acc.query_errors = {key: _kept_rows(total, masks) for key, total in acc.query_errors.items()}
        acc.accumulated = _kept_rows(acc.accumulated, masks)

    def _accumulate(self, layer: int, acc: _LayerAccumulators, addition: torch.Tensor, q_len: int) -> None:
        # heads_kept keeps the session-long sums aligned with the heads: the new block adds on.
        acc.accumulated = _grow_add(acc.accumulated, addition)

    def head_statistics(self, layer: int) -> list[torch.Tensor]:
        """The negotiated statistics of `layer`, float32, each (sum of L_h,): head 0's tokens,
        then head 1's, ... (LayerStatistics.values of a per-head session)."""
        store = self.cache.store
        per_head = []
        for h in range(store.num_kv_heads):
            keys, values, positions = store.layers[layer].head(h)
            length = keys.shape[0]
            device = keys.device

            def visible(total: torch.Tensor | None, h: int = h, length: int = length) -> torch.Tensor:
                return _head_row(total, h, length, device)

            observers = self.observers.for_head(h) if self.observers is not None else None
            per_head.append(self._statistics(layer, keys[None].float(), values[None].float(), positions[None],
                                             visible, observers, head=h))
        return [torch.cat([statistics[i][0] for statistics in per_head]) for i in range(len(self.requirements))]
