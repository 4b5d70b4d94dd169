"""The per-query output errors (STATISTIC_QUERY_*_ERROR) against brute force: evicting a token
and zeroing its value are recomputed exactly in float64; the key and key-value saliencies equal
the squared first-order change (a Jacobian-vector product of the attention output) that Optimal
Brain Damage keeps, which the true change approaches as the perturbation shrinks."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.worker.query_errors import query_errors

HEADS, GROUP, QUERIES, TOKENS, DIM = 2, 2, 3, 17, 8


def _case(seed: int, sharp: float = 1.0, extreme: bool = False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(HEADS, GROUP, QUERIES, TOKENS, generator=generator, dtype=torch.float64) * 3 * sharp
    if extreme:  # one token with nearly all the weight, and tokens below float32's normal range
        logits[0, 0, 0, 5] = 40.0
        logits[1, 1, 2, 3:6] = -200.0
    values = torch.randn(HEADS, TOKENS, DIM, generator=generator, dtype=torch.float64)
    return logits, torch.softmax(logits, dim=-1), values


def _output(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.einsum("hgql,hld->hgqd", weights / weights.sum(dim=-1, keepdim=True), values)


def _aggregate(per_query: torch.Tensor) -> torch.Tensor:
    return per_query.mean(dim=1).sum(dim=1)


def _brute_force(statistic: int, logits, probs, values) -> torch.Tensor:
    """Per (head, group, query, token), float64: the squared change of the output."""
    base = _output(probs, values)
    errors = torch.zeros_like(probs)
    for j in range(TOKENS):
        if statistic == pb.STATISTIC_QUERY_EVICT_ERROR:
            weights = probs.clone()
            weights[..., j] = 0.0
            changed = _output(weights, values)
        elif statistic == pb.STATISTIC_QUERY_VALUE_ERROR:
            zeroed = values.clone()
            zeroed[:, j] = 0.0
            changed = _output(probs, zeroed)
        else:  # the first-order change along the pruning direction, by automatic differentiation
            def output_of(t: torch.Tensor) -> torch.Tensor:
                if statistic == pb.STATISTIC_QUERY_KEY_ERROR:  # z_j -> (1 - t) z_j: t = 1 prunes the key
                    moved = logits.clone()
                    moved[..., j] = logits[..., j] * (1 - t)
                    return _output(torch.softmax(moved, dim=-1), values)
                weights = probs.clone()  # the pair: its weight -> (1 - t) p_j, the rest renormalised
                weights[..., j] = probs[..., j] * (1 - t)
                return _output(weights, values)

            _, tangent = jvp(output_of, (torch.zeros((), dtype=torch.float64),), (torch.ones((), dtype=torch.float64),))
            errors[..., j] = tangent.square().sum(dim=-1)
            continue
        errors[..., j] = (changed - base).square().sum(dim=-1)
    return errors


STATISTICS = [pb.STATISTIC_QUERY_EVICT_ERROR, pb.STATISTIC_QUERY_VALUE_ERROR, pb.STATISTIC_QUERY_KEY_ERROR,
              pb.STATISTIC_QUERY_KEY_VALUE_ERROR]


@pytest.mark.parametrize("statistic", STATISTICS, ids=lambda s: pb.Statistic.Name(s))
@pytest.mark.parametrize("seed,extreme", [(0, False), (1, False), (2, True)])
def test_closed_forms_equal_brute_force(statistic, seed, extreme):
    logits, probs, values = _case(seed, extreme=extreme)
    expected = _aggregate(_brute_force(statistic, logits, probs, values))
    got = query_errors(statistic, probs.float(), values.float(), logits.float()).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-9)


def test_one_query_head_is_its_own_error():
    logits, probs, values = _case(3)
    one = probs[:1, :1, :1]
    expected = _brute_force(pb.STATISTIC_QUERY_EVICT_ERROR, logits, probs, values)[0, 0, 0]
    got = query_errors(pb.STATISTIC_QUERY_EVICT_ERROR, one.float(), values[:1].float())[0].double()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-9)


def test_the_key_saliency_approaches_the_true_change_of_pruning_the_key_as_logits_shrink():
    """The first-order change misses the second-order term: its relative error falls with the
    logits' scale (0.76 at a logit spread of 0.3, 0.06 at 0.03 here), linearly."""
    relative = []
    for sharp in (0.1, 0.01):
        logits, probs, values = _case(4, sharp=sharp)
        saliency = query_errors(pb.STATISTIC_QUERY_KEY_ERROR, probs, values, logits)
        true = torch.zeros(HEADS, TOKENS, dtype=torch.float64)
        base = _output(probs, values)
        for j in range(TOKENS):
            moved = logits.clone()
            moved[..., j] = 0.0
            true[:, j] = (_output(torch.softmax(moved, dim=-1), values) - base).square().sum(-1).mean(dim=1).sum(dim=1)
        relative.append(float(((saliency - true).abs() / true).max()))
    assert relative[1] < relative[0] / 5 and relative[1] < 0.1


def test_the_collector_sums_the_errors_of_the_periods_last_window_queries():
    """A period of 6 queries in two forwards of 3, window 4: the statistic is the errors of
    queries 2..5 (the first forward's last one and all of the second's), each on its cache."""
    from kvevict.worker.statistics import Requirement, StatisticsCollector

    class Cache:
        def positions(self, layer):
            return torch.arange(TOKENS).expand(HEADS, -1)

        def window(self, layer):
            return 0

    requirement = Requirement(pb.STATISTIC_QUERY_EVICT_ERROR, window=4, dtype=1)
    collector = StatisticsCollector([requirement], 1, Cache())
    collector.start_period(6)
    _, probs, values = _case(5)
    probs, values = torch.cat([probs, probs.flip(-1)], dim=2).float(), values.float()  # 6 queries
    for first in (0, 3):
        start = collector.first_needed_query(0, 3)
        collector.record_attention(0, probs[:, :, first + start:first + 3], skipped=start, queries=3, values=values)
    keys = torch.randn(1, HEADS, TOKENS, DIM)
    got = collector.layer_statistics(0, keys, values[None])[0]
    torch.testing.assert_close(got, query_errors(pb.STATISTIC_QUERY_EVICT_ERROR, probs[:, :, 2:], values))


@pytest.mark.parametrize("seed,extreme", [(0, False), (6, True)])
def test_the_projected_error_is_the_change_of_the_layers_output_after_w_o(seed, extreme):
    """Evicting token j from one KV head changes the outputs of its group's query heads; through
    W_O their changes add up in the layer's output. Brute force: remove it, renormalise, project."""
    from kvevict.worker.query_errors import projected_errors, projected_gram, projection_slices

    logits, probs, values = _case(seed, extreme=extreme)
    d_model = 12
    weight = torch.randn(d_model, HEADS * GROUP * DIM, generator=torch.Generator().manual_seed(seed + 100),
                         dtype=torch.float64)  # W_O: (d_model, Hq * d), query heads in order
    slices = weight.t().reshape(HEADS, GROUP, DIM, d_model)
    expected = torch.zeros(HEADS, TOKENS, dtype=torch.float64)
    base = _output(probs, values)  # (Hkv, g, q, d)
    for h in range(HEADS):
        for j in range(TOKENS):
            weights = probs.clone()
            weights[h, :, :, j] = 0.0
            change = _output(weights, values)[h] - base[h]  # (g, q, d)
            projected = torch.einsum("gdm,gqd->qm", slices[h], change)
            expected[h, j] = projected.square().sum()
    got = projected_errors(probs, values, projected_gram(weight, HEADS, DIM), projection_slices(weight, HEADS, DIM))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-12)
    got32 = projected_errors(probs.float(), values.float(), projected_gram(weight, HEADS, DIM),
                             projection_slices(weight, HEADS, DIM))
    torch.testing.assert_close(got32.double(), expected, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox"])
def test_w_o_slices_are_what_each_query_heads_output_goes_through(arch):
    """The slices sum to the module's own output projection of the concatenated heads."""
    from transformers import AutoModelForCausalLM

    from kvevict.worker.query_errors import output_projection, projection_slices
    from tests.tiny_models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    attention = next(m for name, m in model.named_modules() if type(m).__name__.endswith("Attention"))
    layer = next(getattr(attention, n) for n in ("o_proj", "out_proj", "dense", "c_proj") if hasattr(attention, n))
    heads, head_dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    outputs = torch.randn(heads, head_dim, generator=torch.Generator().manual_seed(0))
    slices = projection_slices(output_projection(attention).detach(), kv_heads, head_dim)
    mine = torch.einsum("hgdm,hgd->m", slices, outputs.reshape(kv_heads, heads // kv_heads, head_dim))
    bias = getattr(layer, "bias", None)
    theirs = layer(outputs.reshape(1, -1)).detach()[0] - (0 if bias is None else bias.detach())
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
