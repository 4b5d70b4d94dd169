"""Per-query output errors of pruning each cached token, for a window of queries: the
statistics STATISTIC_QUERY_*_ERROR (per-query CAOTE, OBCache's value, key and key-value scores).

For query head i with attention p_ij, logits z_ij and output o_i = sum_j p_ij v_j:

    evict j (exact)                 p_ij^2 ||v_j - o_{i,-j}||^2 = (p_ij / (1 - p_ij))^2 ||v_j - o_i||^2
    v_j -> 0 (exact)                p_ij^2 ||v_j||^2
    k_j -> 0, first order           z_ij^2 p_ij^2 ||v_j - o_i||^2
    k_j, v_j together, first order  p_ij^2 ||v_j - o_i||^2

The first-order forms are Optimal Brain Damage of the squared output change: at the unpruned
point the change and its gradient are zero, so its second-order Taylor term is the squared norm
of the first-order change J delta (do_i/dz_ij = p_ij (v_j - o_i); dropping the pair scales its
weight to 0 with the rest renormalised, whose derivative is the same). Each query head's error,
then the GQA group's mean, summed over the window's queries: (Hkv, L) float32.
"""

from __future__ import annotations

import torch

from kvevict.v1 import cache_manager_pb2 as pb


def query_errors(statistic: int, probs: torch.Tensor, values: torch.Tensor,
                 logits: torch.Tensor | None = None) -> torch.Tensor:
    """probs (Hkv, g, q, L) float32 over the cache, values (Hkv, L, d); logits as probs (the key
    error only). Returns (Hkv, L): the group mean of each query head's error, summed over q."""
    values = values.to(probs.dtype)
    if statistic == pb.STATISTIC_QUERY_VALUE_ERROR:
        errors = probs.square() * values.square().sum(dim=-1)[:, None, None, :]
    else:
        outputs = torch.einsum("hgql,hld->hgqd", probs, values)
        deviation = _squared_deviation(values, outputs)
        if statistic == pb.STATISTIC_QUERY_EVICT_ERROR:
            errors = _evict_errors(probs, values, deviation)
        elif statistic == pb.STATISTIC_QUERY_KEY_ERROR:
            if logits is None:
                raise ValueError("the key error needs the probabilities' logits")
            # Masked keys have logit -inf and weight 0: no error, not nan.
            errors = (torch.where(probs > 0, logits, 0.0) * probs).square() * deviation
        elif statistic == pb.STATISTIC_QUERY_KEY_VALUE_ERROR:
            errors = probs.square() * deviation
        else:
            raise ValueError(f"statistic {statistic} is not a per-query output error")
    return errors.mean(dim=1).sum(dim=1)


def _squared_deviation(values: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """||v_j - o_i||^2 (Hkv, g, q, L) without a (.., L, d) temporary: |v|^2 - 2 v.o + |o|^2."""
    cross = torch.einsum("hgqd,hld->hgql", outputs, values)
    squared = values.square().sum(dim=-1)[:, None, None, :] - 2.0 * cross + outputs.square().sum(dim=-1)[..., None]
    return squared.clamp_min(0.0)


def _evict_errors(probs: torch.Tensor, values: torch.Tensor, deviation: torch.Tensor) -> torch.Tensor:
    """p^2 ||v_j - o_{-j}||^2: every token but a row's heaviest has p <= 1/2, so dividing by
    (1 - p)^2 is well conditioned; the heaviest one's o_{-j} is summed from the others directly
    (with p = 1 - 1e-9, 1 - p and v_j - o both round to 0 in float32)."""
    errors = probs.square() * deviation / (1.0 - probs).clamp_min(0.5).square()
    top = probs.argmax(dim=-1, keepdim=True)  # (Hkv, g, q, 1)
    rest = probs.scatter(-1, top, 0.0)
    rest_total = rest.sum(dim=-1, keepdim=True)
    # No other token weighs anything (a lone token, or underflow): they count alike.
    others = torch.ones_like(rest).scatter(-1, top, 0.0)
    rest = torch.where(rest_total > 0, rest, others)
    rest = rest / rest.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    rest_outputs = torch.einsum("hgql,hld->hgqd", rest, values)
    heads, group, queries = probs.shape[:3]
    top_values = values[torch.arange(heads)[:, None, None], top[..., 0]]  # (Hkv, g, q, d)
    top_error = probs.gather(-1, top).square()[..., 0] * (top_values - rest_outputs).square().sum(dim=-1)
    return errors.scatter(-1, top, top_error[..., None])


def output_projection(module: torch.nn.Module) -> torch.Tensor:
    """The attention module's output projection W_O as (d_model, Hq * d): o_proj (Llama family),
    out_proj (OPT), dense (GPT-NeoX), c_proj (GPT-2's Conv1D, stored transposed)."""
    for name in ("o_proj", "out_proj", "dense", "c_proj"):
        layer = getattr(module, name, None)
        if layer is not None:
            weight = layer.weight
            return weight.t() if type(layer).__name__ == "Conv1D" else weight
    raise ValueError(f"{type(module).__name__} has no output projection kvevict knows (o_proj, out_proj, dense, "
                     "c_proj): the projected error cannot be measured")


def projected_gram(weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """G[h, a, b] = W_a^T W_b (Hkv, g, g, d, d) float32 for the query heads a, b of KV head h,
    W_a the (d_model, d) slice of W_O that head a's output goes through."""
    slices = weight.float().t().reshape(-1, head_dim, weight.shape[0])  # (Hq, d, d_model)
    group = slices.shape[0] // num_kv_heads
    slices = slices.reshape(num_kv_heads, group, head_dim, -1)
    return torch.einsum("hadm,hbem->habde", slices, slices)


def projected_errors(probs: torch.Tensor, values: torch.Tensor, gram: torch.Tensor,
                     slices: torch.Tensor) -> torch.Tensor:
    """LaProx-style: per KV head and token j, the squared change of the layer's output after W_O
    when j is evicted from that head (all its query heads together: their changes interact
    through W_O), summed over the queries. probs (Hkv, g, q, L), values (Hkv, L, d), gram from
    projected_gram, slices (Hkv, g, d, d_model) the heads' W_O slices (for the exact top tokens).

    The change of query head a is -p_a (v_j - o_{a,-j}) = -c_a (v_j - o_a), c = p / (1 - p); the
    squared norm of sum_a W_a c_a (v_j - o_a) expands into Gram terms. A row's heaviest token (p
    near 1: c and v_j - o_a are ill-conditioned) is recomputed exactly from the other tokens."""
    values = values.to(probs.dtype)
    gram = gram.to(probs.dtype)
    outputs = torch.einsum("hgql,hld->hgqd", probs, values)  # (Hkv, g, q, d)
    c = probs / (1.0 - probs).clamp_min(0.5)
    vgv = torch.einsum("hld,habde,hle->habl", values, gram, values)  # v^T G_ab v
    vgo = torch.einsum("hld,habde,hbqe->habql", values, gram, outputs)  # v^T G_ab o_b
    ogo = torch.einsum("haqd,habde,hbqe->habq", outputs, gram, outputs)  # o_a^T G_ab o_b
    terms = vgv[:, :, :, None, :] - vgo - vgo.transpose(1, 2) + ogo[..., None]
    errors = torch.einsum("haql,hbql,habql->hql", c, c, terms).clamp_min(0.0)
    # Each query head's heaviest token (the only one that may weigh more than 1/2), exactly: for
    # every KV head, query and candidate k (head k's top token j_k), each head a's change there.
    top = probs.argmax(dim=-1)  # (Hkv, g, q)
    candidates = values.gather(1, top.flatten(1)[..., None].expand(-1, -1, values.shape[-1]))
    candidates = candidates.view(*top.shape, -1)  # (Hkv, k, q, d): v_{j_k}
    index = top.transpose(1, 2)[:, None].expand(-1, probs.shape[1], -1, -1)  # (Hkv, a, q, k): j_k
    weight_at = probs.gather(-1, index).permute(0, 1, 3, 2)  # (Hkv, a, k, q): p_a at j_k
    rest = probs.scatter(-1, top[..., None], 0.0)
    rest_total = rest.sum(dim=-1, keepdim=True)
    rest = torch.where(rest_total > 0, rest, torch.ones_like(rest).scatter(-1, top[..., None], 0.0))
    rest_outputs = torch.einsum("hgql,hld->hgqd", rest / rest.sum(dim=-1, keepdim=True), values)  # o_{a,-top_a}
    same = top[:, :, None, :] == top[:, None, :, :]  # (Hkv, a, k, q): j_k is head a's own top
    regular = (candidates[:, None] - outputs[:, :, None]) / (1.0 - weight_at).clamp_min(0.5)[..., None]
    own = candidates[:, None] - rest_outputs[:, :, None]
    changes = weight_at[..., None] * torch.where(same[..., None], own, regular)  # (Hkv, a, k, q, d)
    projected = torch.einsum("hadm,hakqd->hkqm", slices.to(probs.dtype), changes)
    exact = projected.square().sum(dim=-1)  # (Hkv, k, q)
    errors = errors.scatter(-1, top.transpose(1, 2).contiguous(), exact.transpose(1, 2).contiguous())
    return errors.sum(dim=1)


def projection_slices(weight: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """W_O's per query head slices as (Hkv, g, d, d_model) float32."""
    slices = weight.float().t().reshape(-1, head_dim, weight.shape[0])
    return slices.reshape(num_kv_heads, slices.shape[0] // num_kv_heads, head_dim, -1)
