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
