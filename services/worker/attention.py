"""The `kvevict` attention implementation for transformers models.

Registered with transformers' `AttentionInterface` (and a matching `AttentionMaskInterface`
entry that builds no shared mask), so any causal LM loaded with `attn_implementation="kvevict"`
runs it in every layer; `install` switches a model loaded with another attention to it for as
long as a `CacheSession` lasts. It differs from eager attention in two ways:

* the mask is built per layer from that layer's own cache length (and, for sliding-window
  layers, the absolute positions of its cached tokens), because after eviction layers and heads
  no longer hold the same tokens: every cached token is visible, causal inside the new block;
* when a `StatisticsCollector` rides along in the forward's kwargs (`kvevict_collector`), the
  attention probabilities of the queries its statistics need are handed to it, in float32.

Without statistics, or when a statistic needs only some queries' probabilities (window
policies), the output is SDPA's and the probabilities are computed beside it for those queries
only; when every query's are needed (attention sums) or the logits are soft-capped (Gemma 2,
which SDPA cannot apply), one explicit float32 pass gives the probabilities and the output.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from kvevict.worker.observers import CAPTURE_KWARG
from kvevict.worker.ragged_cache import RAGGED_KWARG
from kvevict.worker.ragged_kv import ragged_attention

ATTN_IMPLEMENTATION = "kvevict"
COLLECTOR_KWARG = "kvevict_collector"
# On a model switched by `install`: (the implementation it had before, sessions open on it).
_INSTALLED = "_kvevict_installed"


class UnsupportedModel(ValueError):
    """A model whose attention kvevict cannot run (it does not go through the AttentionInterface)."""


def use_kvevict_attention(model: PreTrainedModel) -> None:
    """Switches `model` to kvevict attention (nothing to do when it was loaded with it).

    Without it a model measures no statistics (policies would evict on zeros) and masks no pruned
    cache, so a model whose attention transformers cannot switch is refused: UnsupportedModel.
    """
    if model.config._attn_implementation == ATTN_IMPLEMENTATION:
        return
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModel(
            f"{type(model).__name__} computes attention in its own code, not through transformers' "
            "AttentionInterface, so kvevict can neither measure nor mask it; use one of the supported "
            "architectures (README, 'Supported architectures')")
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise UnsupportedModel(f"{type(model).__name__} refused attn_implementation={ATTN_IMPLEMENTATION!r}")


def install(model: PreTrainedModel) -> None:
    """use_kvevict_attention for the time of one session: the last `uninstall` of as many calls
    restores the attention the model had before the first."""
    previous, sessions = getattr(model, _INSTALLED, (model.config._attn_implementation, 0))
    use_kvevict_attention(model)
    setattr(model, _INSTALLED, (previous, sessions + 1))


def uninstall(model: PreTrainedModel) -> None:
    """Undoes one `install`."""
    previous, sessions = getattr(model, _INSTALLED, (None, 0))
    if sessions > 1:
        setattr(model, _INSTALLED, (previous, sessions - 1))
    elif sessions == 1:
        delattr(model, _INSTALLED)
        if previous != model.config._attn_implementation:
            model.set_attn_implementation(previous)


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
    capture = kwargs.get(CAPTURE_KWARG)
    if capture is not None:  # observer queries (kvevict.worker.observers): keep this layer's
        capture.record(layer, query, num_kv_heads, scaling, softcap, sliding_window)
    if collector is not None and (sliding_window or 0) != collector.cache.window(layer):
        # The cache drops tokens by the window the geometry announced: it must be this one.
        raise ValueError(f"layer {layer} attends with sliding window {sliding_window}, the cache geometry "
                         f"says {collector.cache.window(layer)} (0 = full attention): the model config's "
                         "layer types disagree with its attention modules")

    ragged = kwargs.get(RAGGED_KWARG)
    if ragged is not None:  # a per-head session: the store holds the cache, `key`/`value` are the block
        return _attend_ragged(module, query, ragged, layer, scaling, softcap, collector)

    visible = _visibility(collector, layer, q_len, kv_len, sliding_window, query.device)
    records = collector is not None and collector.needs_attention
    if softcap is None and not (records and collector.needs_every_query):
        # Window policies need the period's last `window` queries' probabilities at most: the
        # output is SDPA's, as with the full cache (with nothing evicted, its logits bit for
        # bit), and the probabilities are computed beside it for those queries only.
        first = collector.first_needed_query(layer, q_len) if records else q_len
        out = _sdpa(query, key, value, visible, scaling, group, windowed=bool(sliding_window))
        if records:
            probs = logits = None
            if first < q_len:
                probs, logits = _probabilities(query[:, :, first:], key, visible[:, first:], num_kv_heads, scaling,
                                               None)
            collector.record_attention(layer, probs, skipped=first, queries=q_len, values=value[0],
                                       logits=logits if collector.needs_logits else None, module=module)
        return out, None

    # Every query's probabilities are needed (sums, accumulated attention), or the logits are
    # soft-capped (Gemma 2: no SDPA kernel applies that): one float32 pass gives both.
    probs, logits = _probabilities(query, key, visible, num_kv_heads, scaling, softcap)
    out32 = torch.einsum("hgqk,hkd->hgqd", probs, value[0].float())
    if records:
        collector.record_attention(layer, probs, skipped=0, queries=q_len, values=value[0],
                                   logits=logits if collector.needs_logits else None, module=module)
    out = out32.to(query.dtype).reshape(1, num_query_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def _attend_ragged(module: torch.nn.Module, query: torch.Tensor, cache: Any, layer: int, scaling: float,
                   softcap: float | None, collector: Any) -> tuple[torch.Tensor, None]:
    """kvevict_attention over a HeadPrunableCache's store, the q new tokens already appended to
    every head. The output is ragged attention's (SDPA per run of equal heads); probabilities
    for the statistics come, as in the rectangular path, from one float32 pass over the layer
    left-aligned (zeros after each head's end), and so do the output's when every query's
    probabilities are needed or the logits are soft-capped."""
    q_len = query.shape[2]
    store = cache.store
    records = collector is not None and collector.needs_attention
    if softcap is None and not (records and collector.needs_every_query):
        out, _ = ragged_attention(query, store, layer, scaling, block=q_len)
        first = collector.first_needed_query(layer, q_len) if records else q_len
        if records:
            probs = logits = values = None
            if first < q_len:
                keys, values, visible = _left_aligned(store, layer, q_len)
                probs, logits = _probabilities(query[:, :, first:], keys, visible[:, first:], store.num_kv_heads,
                                               scaling, None)
            collector.record_attention(layer, probs, skipped=first, queries=q_len,
                                       values=None if values is None else values[0],
                                       logits=logits if collector.needs_logits else None, module=module,
                                       kv_shape=(store.num_kv_heads, query.shape[-1]))
        return out, None
    keys, values, visible = _left_aligned(store, layer, q_len)
    probs, logits = _probabilities(query, keys, visible, store.num_kv_heads, scaling, softcap)
    out32 = torch.einsum("hgqk,hkd->hgqd", probs, values[0].float())
    if records:
        collector.record_attention(layer, probs, skipped=0, queries=q_len, values=values[0],
                                   logits=logits if collector.needs_logits else None, module=module)
    _, num_query_heads, _, head_dim = query.shape
    out = out32.to(query.dtype).reshape(1, num_query_heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def _left_aligned(store: Any, layer: int, q_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ragged layer as keys/values (1, Hkv, Lmax, d), each head's tokens first and zeros after,
    and the visibility (Hkv, q, Lmax) of its last q tokens' queries: causal inside the block,
    nothing past a head's end."""
    keys, values, _, _ = store.to_rectangular(layer)
    lengths = torch.tensor(store.lengths(layer), device=keys.device)
    column = torch.arange(keys.shape[2], device=keys.device)
    last = lengths[:, None] - q_len + torch.arange(q_len, device=keys.device)[None, :]  # query i's own column
    return keys, values, column[None, None, :] <= last[:, :, None]


def _probabilities(query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, num_kv_heads: int, scaling: float,
                   softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention probabilities (Hkv, group, q, L) of `query` (1, Hq, q, d) over `key`,
    and their logits (-inf where not visible)."""
    _, num_query_heads, q_len, head_dim = query.shape
    # Grouped layout (Hkv, group, q, d): the query heads of one KV head share its keys.
    q32 = query[0].float().view(num_kv_heads, num_query_heads // num_kv_heads, q_len, head_dim)
    scores = torch.einsum("hgqd,hkd->hgqk", q32, key[0].float()) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return torch.softmax(scores, dim=-1), scores


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
    windowed: bool = False,
) -> torch.Tensor:
    """The output through SDPA (1, q, Hq, d), as the full cache computes it."""
    # GQA without copying the cache per query head; one query that sees every cached token (a
    # decode step outside any window) needs no mask. Both give the same bits as repeated keys.
    if query.shape[2] == 1 and not windowed:
        mask = None
    else:
        mask = visible.repeat_interleave(group, dim=0).unsqueeze(0) if visible.shape[0] > 1 else visible.unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=group > 1)
    return out.transpose(1, 2).contiguous()


def _no_shared_mask(*args: Any, **kwargs: Any) -> None:
    # Masks are per layer (see _visibility): the model-wide mask would assume equal cache lengths.
    return None


def register() -> None:
    """Makes `attn_implementation="kvevict"` available to every transformers model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvevict_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_shared_mask)


register()
