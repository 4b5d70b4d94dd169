"""Observer queries: the queries of tokens not yet in the cache (a question still to come) as the
observation window of window statistics (TOVA, SnapKV, CAOTE's window reference).

`QueryCapture` rides along in one forward of those tokens alone, at their true positions, and
keeps each layer's queries after RoPE; `ObserverQueries` then gives, for any cache, the attention
those queries would pay it (GQA group mean, summed over the observers), in float32. Their memory
is a few queries per layer, nothing per cached token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CAPTURE_KWARG = "kvevict_query_capture"


@dataclass(frozen=True)
class LayerQueries:
    queries: torch.Tensor  # (Hkv, group, m, d) float32, RoPE applied
    positions: torch.Tensor  # (m,) absolute positions of the observers
    scaling: float
    softcap: float | None
    window: int  # sliding window of the layer, 0 = full attention


@dataclass
class QueryCapture:
    """What attention hands over during the capture forward: layer -> its queries."""

    positions: torch.Tensor
    layers: dict[int, LayerQueries] = field(default_factory=dict)
    # Several forwards (lookahead: one token each) append their queries instead of replacing them.
    accumulate: bool = False

    def record(self, layer: int, query: torch.Tensor, num_kv_heads: int, scaling: float,
               softcap: float | None, sliding_window: int | None) -> None:
        """query (1, Hq, m, d) as attention receives it."""
        _, num_query_heads, m, head_dim = query.shape
        grouped = query[0].float().reshape(num_kv_heads, num_query_heads // num_kv_heads, m, head_dim)
        previous = self.layers.get(layer) if self.accumulate else None
        if previous is not None:
            grouped = torch.cat([previous.queries, grouped], dim=2)
        self.layers[layer] = LayerQueries(grouped, self.positions[: grouped.shape[2]].to(query.device), scaling,
                                          softcap, sliding_window or 0)


class ObserverQueries:
    """The captured queries of every layer, as an observation window."""

    def __init__(self, capture: QueryCapture) -> None:
        self.layers = dict(capture.layers)

    def attention(self, layer: int, keys: torch.Tensor, key_positions: torch.Tensor, window: int) -> torch.Tensor:
        """Attention (Hkv, L) of the last `window` observers over `keys` (Hkv, L, d) float32 at
        `key_positions` (Hkv, L), summed over them (as ATTN_WINDOW sums its window's queries)."""
        probs, _ = self.probabilities(layer, keys, key_positions, window)
        return probs.mean(dim=1).sum(dim=1)

    def probabilities(self, layer: int, keys: torch.Tensor, key_positions: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query head (Hkv, g, m, L): the last `window` observers' probabilities and logits."""
        observed = self.layers[layer]
        queries, positions = observed.queries[:, :, -window:], observed.positions[-window:]
        scores = torch.einsum("hgqd,hkd->hgqk", queries, keys) * observed.scaling
        if observed.softcap is not None:
            scores = observed.softcap * torch.tanh(scores / observed.softcap)
        if observed.window:  # the observers see only what their own window holds
            seen = key_positions.to(keys.device)[:, None, :] > positions[None, :, None] - observed.window
            scores = scores.masked_fill(~seen[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row seeing nothing weighs nothing
        return probs, scores
