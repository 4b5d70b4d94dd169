"""The virtual query of CAOTE, on the worker where the values are.

A base policy's score, normalised, is the attention `a` of a virtual query with output
o = sum_i a_i v_i. `excluded_deviation` gives ||v_j - o_{-j}||, o_{-j} the output with token j
left out and the rest renormalised: CAOTE's score is a_j times it. `reference_weights` builds the
weights each base's score implies (pb.Reference), from the same statistics the manager scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvevict.v1 import cache_manager_pb2 as pb


def excluded_deviation(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """||v_j - o_{-j}|| per token, (H, L), float32, exact at the extremes.

    weights (H, L) non-negative, any scale (a row summing to 0 counts as uniform); values (H, L, d).
    For every token but the heaviest of its row, a_j <= 1/2, so ||v_j - o|| / (1 - a_j) is
    well conditioned. The heaviest token's o_{-j} is summed from the other tokens directly: with
    a_j = 1 - 1e-9, 1 - a_j and v_j - o both round to 0 in float32, their ratio does not exist.
    """
    weights = weights.float()
    values = values.float()
    total = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    total = weights.sum(dim=-1, keepdim=True)
    a = weights / total
    output = torch.einsum("hl,hld->hd", a, values)
    deviation = torch.linalg.vector_norm(values - output[:, None, :], dim=-1) / (1.0 - a).clamp_min(0.5)
    top = a.argmax(dim=-1, keepdim=True)  # (H, 1)
    rest = weights.scatter(-1, top, 0.0)
    # Nothing else weighs anything (float32 underflow): the others count alike.
    others = torch.ones_like(rest).scatter(-1, top, 0.0)
    rest = torch.where(rest.sum(dim=-1, keepdim=True) > 0, rest, others)
    # A lone token has no others (o_{-j} = 0 then; the manager scores it +inf anyway).
    rest_total = rest.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    rest_output = torch.einsum("hl,hld->hd", rest / rest_total, values)
    top_value = values.gather(1, top[:, :, None].expand(-1, -1, values.shape[-1]))[:, 0]
    top_deviation = torch.linalg.vector_norm(top_value - rest_output, dim=-1, keepdim=True)
    return deviation.scatter(-1, top, top_deviation)


def max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Same-size max-pool along the last axis of (H, L); edges see only the tokens that exist
    (the manager's `max_pool` on the same numbers)."""
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores[:, None, :], kernel, stride=1, padding=kernel // 2)[:, 0, :]


def key_cosine(keys: torch.Tensor) -> torch.Tensor:
    """cos(k_j, mu) (H, L), mu = mean of the head's L2-normalised keys; keys (H, L, d) float32."""
    unit = F.normalize(keys, dim=-1)
    mean_unit = F.normalize(unit.mean(dim=1), dim=-1)
    return torch.einsum("hkd,hd->hk", unit, mean_unit)


def mean_deviation(values: torch.Tensor) -> torch.Tensor:
    """||v_j - mean v|| (H, L); values (H, L, d) float32."""
    return torch.linalg.vector_norm(values - values.mean(dim=1, keepdim=True), dim=-1)


def reference_weights(reference: int, *, window_attention: torch.Tensor | None, pool_kernel: int,
                      accumulated: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    """The virtual query's weights (H, L) for a pb.Reference, as the base's attention_like(score)
    computes them on the manager (up to the wire's rounding of the score)."""
    if reference == pb.REFERENCE_WINDOW_ATTENTION:
        return max_pool(window_attention, pool_kernel)
    if reference == pb.REFERENCE_ACCUMULATED_ATTENTION:
        return accumulated
    if reference == pb.REFERENCE_KEY_DISSIMILARITY:
        return ((1.0 - key_cosine(keys)) / 2.0).clamp_min(0.0)
    if reference == pb.REFERENCE_POSITION:
        positions = positions.to(values.device, torch.float64)
        return (positions - positions.min(dim=-1, keepdim=True).values + 1.0).float()
    if reference == pb.REFERENCE_VALUE_DEVIATION:
        return mean_deviation(values)
    if reference == pb.REFERENCE_UNIFORM:
        return torch.ones(values.shape[:2], device=values.device)
    raise ValueError(f"the worker cannot compute reference {reference}")
