"""The `kvevict` attention implementation for transformers models.

Registered with transformers' `AttentionInterface` (and a matching `AttentionMaskInterface`
entry that builds no shared mask), so any causal LM loaded with `attn_implementation="kvevict"`
runs it in every layer. It differs from eager attention in two ways:

* the mask is built per layer from that layer's own cache length (and, for sliding-window
  layers, the absolute positions of its cached tokens), because after eviction layers and heads
  no longer hold the same tokens: every cached token is visible, causal inside the new block;
* when a `StatisticsCollector` rides along in the forward's kwargs (`kvevict_collector`), the
  attention probabilities of the layer are handed to it, in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "kvevict"
COLLECTOR_KWARG = "kvevict_collector"


def kvevict_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over a (possibly pruned) cache; shapes as transformers passes them.

    query (1, Hq, q, d); key/value (1, Hkv, L, d) with the q new tokens last.
    Returns the output as (1, q, Hq, d) in the query's dtype.
    """
    batch, num_query_heads, q_len, head_dim = query.shape
    num_kv_heads, kv_len = key.shape[1], key.shape[2]
    if batch != 1:
        raise ValueError(f"kvevict attention serves one sequence per forward, got batch size {batch}")
    if num_query_heads % num_kv_heads:
        raise ValueError(f"{num_query_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_query_heads // num_kv_heads
    scaling = head_dim**-0.5 if scaling is None else scaling
    collector = kwargs.get(COLLECTOR_KWARG)
    layer = getattr(module, "layer_idx", None)

    visible = _visibility(collector, layer, q_len, kv_len, sliding_window, query.device)
    if collector is None or not collector.needs_attention:
        return _sdpa(query, key, value, visible, scaling, group, softcap), None

    # Grouped layout (Hkv, group, q, d): the query heads of one KV head share its keys.
    q32 = query[0].float().view(num_kv_heads, group, q_len, head_dim)
    k32, v32 = key[0].float(), value[0].float()
    scores = torch.einsum("hgqd,hkd->hgqk", q32, k32) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out32 = torch.einsum("hgqk,hkd->hgqd", probs, v32)
    collector.record_attention(layer, probs)
    out = out32.to(query.dtype).reshape(1, num_query_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def _visibility(
    collector: Any, layer: int | None, q_len: int, kv_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """Boolean (Hkv or 1, q, L): causal inside the new block, every older cached token visible."""
    # The q new tokens are the last q rows of the cache (bottom-right aligned causal mask).
    key_index = torch.arange(kv_len, device=device)
    query_index = torch.arange(kv_len - q_len, kv_len, device=device)
    visible = (key_index[None, :] <= query_index[:, None]).unsqueeze(0)
    if sliding_window is not None and collector is not None:
        key_pos = collector.cache.positions(layer).to(device)  # (Hkv, L) absolute positions
        query_pos = key_pos[0, kv_len - q_len :]
        visible = visible & (key_pos[:, None, :] > query_pos[None, :, None] - sliding_window)
    elif sliding_window is not None:
        visible = visible & (key_index[None, :] > query_index[:, None] - sliding_window).unsqueeze(0)
    return visible


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    group: int,
    softcap: float | None,
) -> torch.Tensor:
    """Fast path when no statistic needs the attention probabilities."""
    if softcap is not None:
        raise ValueError("attention softcapping needs statistics mode (eager path); no fast path for it")
    key = key.repeat_interleave(group, dim=1) if group > 1 else key
    value = value.repeat_interleave(group, dim=1) if group > 1 else value
    mask = visible.repeat_interleave(group, dim=0).unsqueeze(0) if visible.shape[0] > 1 else visible.unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def _no_shared_mask(*args: Any, **kwargs: Any) -> None:
    # Masks are per layer (see _visibility): the model-wide mask would assume equal cache lengths.
    return None


def register() -> None:
    """Makes `attn_implementation="kvevict"` available to every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvevict_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_shared_mask)


register()
