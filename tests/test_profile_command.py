"""`kvevict profile` and kvevict.profiling: the utility curves and EpiCache's sensitivity against
loop-by-loop references, the command's hooked eager forward against output_attentions=True, and
the CLI end to end on a tiny checkpoint (no download)."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvevict import profile_command, profiling
from kvevict.cache_manager.head_budgets import load_profile
from kvevict.cli import main
from kvevict.profile_command import profile_model, value_norms
from kvevict.profiling import (
    LayerUtility, block_mask, key_similarity, layer_utility, metric_scores, normalize_curves, oracle_importance,
    probe_cuts, profile_curves, retained_utility,
)
from kvevict.worker.model_loader import model_from_config
from tests.checkpoints import TEXT, save_tiny_checkpoint
from tests.tiny_models import tiny_config


def causal_probs(rng: np.random.Generator, heads: int, group: int, length: int) -> np.ndarray:
    """Random causal attention probabilities (heads, group, length, length)."""
    logits = rng.normal(0, 2, (heads, group, length, length))
    logits[..., np.triu_indices(length, 1)[0], np.triu_indices(length, 1)[1]] = -np.inf
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


def loop_importance(probs, cut, future, norms):
    heads, group = probs.shape[:2]
    out = np.zeros((heads, cut))
    for h in range(heads):
        for j in range(cut):
            out[h, j] = max(sum(probs[h, a, k, j] * (1 if norms is None else norms[h, a, j]) for a in range(group))
                            / group for k in range(cut, cut + future))
    return out


def loop_metric(probs, cut, metric):
    heads, group = probs.shape[:2]
    mean = probs.mean(axis=1)
    if metric == "h2o":
        return np.array([[sum(mean[h, q, j] for q in range(cut)) for j in range(cut)] for h in range(heads)])
    if metric == "tova":
        return np.array([[mean[h, cut - 1, j] for j in range(cut)] for h in range(heads)])
    window = [[sum(mean[h, q, j] for q in range(max(cut - 32, 0), cut)) for j in range(cut)] for h in range(heads)]
    return np.array([[max(window[h][max(j - 3, 0):j + 4]) for j in range(cut)] for h in range(heads)])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 3), st.integers(40, 70),
       st.sampled_from(profiling.METRICS), st.booleans())
def test_curves_equal_a_loop_by_loop_reference(seed, heads, group, length, metric, with_norms) -> None:
    rng = np.random.default_rng(seed)
    probs = causal_probs(rng, heads, group, length)
    norms = rng.random((heads, group, length)) + 0.1 if with_norms else None
    future = int(rng.integers(1, 8))
    cut = int(rng.integers(2, length - future + 1))
    importance = oracle_importance(probs, cut, future, norms)
    assert np.allclose(importance, loop_importance(probs, cut, future, norms))
    scores = metric_scores(probs, cut, metric, norms, future)
    assert np.allclose(scores, importance if metric == "oracle" else loop_metric(probs, cut, metric))
    grid = np.array([0.0, 0.1, 0.37, 0.5, 1.0])
    kept = retained_utility(importance, scores, grid)
    for h in range(heads):
        ranked = sorted(range(cut), key=lambda j: (-scores[h, j], -j))  # more recent first among ties
        for k, r in enumerate(grid):
            assert kept[h, k] == pytest.approx(sum(importance[h, j] for j in ranked[:int(np.floor(r * cut + 0.5))]))


def test_the_oracle_metric_bounds_every_other_metric() -> None:
    rng = np.random.default_rng(3)
    probs = causal_probs(rng, 2, 3, 120)
    cuts = probe_cuts(120, 16, 3)
    oracle = layer_utility(probs, cuts, 16, "oracle")
    for metric in ("snapkv", "h2o", "tova"):
        other = layer_utility(probs, cuts, 16, metric)
        assert (other.retained <= oracle.retained + 1e-12).all() and np.allclose(other.totals, oracle.totals)
        assert (other.retained < oracle.retained - 1e-6).any()  # heuristics miss something somewhere


def test_curves_sum_to_one_over_every_head_and_average_the_probes() -> None:
    rng = np.random.default_rng(4)
    layers = [causal_probs(rng, 2, 2, 80) for _ in range(3)]
    cuts = probe_cuts(80, 8, 4)
    curves = profile_curves(iter(layers), cuts, 8, "snapkv")
    assert curves.shape == (3, 2, len(profiling.DEFAULT_GRID))
    assert curves[..., 0].sum() == 0 and curves[..., -1].sum() == pytest.approx(1.0)
    assert (np.diff(curves, axis=-1) >= -1e-15).all()
    # By hand: each probe normalised by its own total, then averaged.
    per_layer = [layer_utility(p, cuts, 8, "snapkv") for p in layers]
    totals = sum(u.totals.sum(axis=1) for u in per_layer)
    expected = np.stack([np.mean([u.retained[i] / totals[i] for i in range(len(cuts))], axis=0) for u in per_layer])
    assert np.allclose(curves, expected)
    assert np.allclose(normalize_curves([LayerUtility(u.retained * 5, u.totals * 5) for u in per_layer]), curves)


def test_probe_cuts_need_enough_text() -> None:
    assert probe_cuts(4000, 128, 8)[0] == 2000 and probe_cuts(4000, 128, 8)[-1] == 3872
    assert probe_cuts(200, 100, 3) == [100]
    with pytest.raises(ValueError, match="needs at least 192"):
        probe_cuts(150, 128, 2)


def loop_block_mask(length: int, block: int, sink: int, overlap: int) -> np.ndarray:
    """EpiCache's rules as its profiler applies them, one block and query at a time."""
    mask = np.zeros((length, length), dtype=bool)
    if length > sink:
        mask[sink:, :sink] = True
    for b in range(length // block + 1):
        start, end = b * block, min((b + 1) * block, length)
        for i in range(start, end):
            mask[i, start:i + 1] = True
        if b > 0 and overlap > 0:
            previous_start, previous_end = (b - 1) * block, min(b * block, length)
            for i in range(start, end):
                mask[i, max(previous_start, previous_end - overlap):previous_end] = True
    return mask


@pytest.mark.parametrize("length,block,sink,overlap", [(50, 10, 3, 5), (64, 16, 0, 0), (33, 7, 7, 3), (20, 40, 4, 20)])
def test_block_mask_follows_epicaches_rules(length: int, block: int, sink: int, overlap: int) -> None:
    mask = block_mask(length, block, sink, overlap)
    assert (mask == loop_block_mask(length, block, sink, overlap)).all()
    assert not np.triu(mask, 1).any()  # never the future


def test_key_similarity_is_epicaches_windowed_cosine() -> None:
    rng = np.random.default_rng(6)
    full = [rng.normal(size=(3, 250, 8)) for _ in range(2)]
    restricted = [full[0], full[1] + rng.normal(size=(3, 250, 8))]
    scores = key_similarity(full, restricted, window=100)
    expected = []
    for a, b in zip(full, restricted):
        cosines = [np.dot(a[h, s:s + 100].ravel(), b[h, s:s + 100].ravel())
                   / np.linalg.norm(a[h, s:s + 100]) / np.linalg.norm(b[h, s:s + 100])
                   for h in range(3) for s in range(0, 250, 100)]
        expected.append(np.mean(cosines))
    assert scores[0] == pytest.approx(1.0) and np.allclose(scores, expected) and scores[1] < 0.9


# --- the model run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    return model_from_config(tiny_config("llama", num_hidden_layers=3), seed=2)


def reference_curves(model, input_ids, cuts, future, metric, with_norms):
    """profile_curves on output_attentions=True's probabilities, value norms through o_proj."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids, output_attentions=True, use_cache=True)
    config = model.config
    kv_heads, heads = config.num_key_value_heads, config.num_attention_heads
    head_dim = config.hidden_size // heads
    probs, norms = [], []
    for layer, attention in enumerate(out.attentions):
        length = attention.shape[-1]
        probs.append(attention[0].reshape(kv_heads, heads // kv_heads, length, length).numpy())
        values = out.past_key_values.layers[layer].values[0]  # (Hkv, L, d)
        o_proj = model.model.layers[layer].self_attn.o_proj
        norm = np.zeros((kv_heads, heads // kv_heads, length))
        for h in range(kv_heads):
            for a in range(heads // kv_heads):
                q = h * (heads // kv_heads) + a
                slot = torch.zeros(length, heads * head_dim)
                slot[:, q * head_dim:(q + 1) * head_dim] = values[h]
                norm[h, a] = torch.linalg.vector_norm(o_proj(slot), dim=-1).detach().numpy()
        norms.append(norm)
    return profile_curves(probs, cuts, future, metric, norms if with_norms else None)


@pytest.mark.parametrize("metric,with_norms", [("snapkv", True), ("h2o", False), ("oracle", True)])
def test_the_hooked_forward_gives_output_attentions_curves(tiny_llama, metric: str, with_norms: bool) -> None:
    input_ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(1))
    curves, similarity, settings_ = profile_model(tiny_llama, input_ids, future=16, probes=3, metric=metric,
                                                  use_value_norms=with_norms, sensitivity=False)
    assert similarity.size == 0 and settings_["cuts"] == probe_cuts(150, 16, 3)
    expected = reference_curves(tiny_llama, input_ids, settings_["cuts"], 16, metric, with_norms)
    assert np.allclose(curves, expected, rtol=1e-5, atol=1e-9)
    assert curves[..., -1].sum() == pytest.approx(1.0)


def test_value_norms_and_attention_only_differ(tiny_llama) -> None:
    input_ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(2))
    with_norms = profile_model(tiny_llama, input_ids, future=8, probes=2, sensitivity=False)[0]
    without = profile_model(tiny_llama, input_ids, future=8, probes=2, sensitivity=False, use_value_norms=False)[0]
    assert not np.allclose(with_norms, without, atol=1e-4)
    module = profile_command.attention_modules(tiny_llama)[1]
    values = torch.randn(2, 5, 16)
    norms = value_norms(module, values)
    slot = torch.zeros(5, 64)
    slot[:, 3 * 16:4 * 16] = values[1]  # query head 3 = KV head 1's second query head
    assert np.allclose(norms[1, 1], torch.linalg.vector_norm(module.o_proj(slot), dim=-1).detach().numpy(), rtol=1e-5)


def test_sensitivity_is_one_without_restriction_and_drops_with_it(tiny_llama) -> None:
    input_ids = torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(3))
    # A block as long as the text restricts nothing: the same keys.
    _, same, _ = profile_model(tiny_llama, input_ids, future=8, probes=2, block=160, sink=0)
    assert np.allclose(same, 1.0, atol=1e-6)
    _, similarity, settings_ = profile_model(tiny_llama, input_ids, future=8, probes=2, block=20, sink=4)
    assert settings_["sensitivity"]["overlap"] == 10 and settings_["sensitivity"]["sink"] == 4
    # Layer 0's keys come from the embeddings alone; later layers see what the mask cut.
    assert similarity[0] == pytest.approx(1.0, abs=1e-6) and (similarity[1:] < 0.9999).all()


def test_the_profile_command_writes_a_profile_the_allocators_read(tmp_path, capsys) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text(TEXT * 12)
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", str(checkpoint), "--text", str(text), "--out", str(out),
                 "--future", "16", "--probes", "3", "--max-tokens", "300"]) == 0
    printed = capsys.readouterr().out
    profile = load_profile(out)
    assert (profile.num_layers, profile.num_kv_heads) == (2, 2) and len(profile.sensitivity) == 2
    assert profile.model == str(checkpoint) and profile.settings["metric"] == "snapkv"
    assert profile.settings["tokens"] <= 300 and len(profile.settings["cuts"]) == 3
    assert f"{out.stat().st_size} bytes" in printed and "lukv at 10%" in printed and "epicache at 20%" in printed
    assert profile.lukv(30, 300).sum() == 30 * 4 and profile.epicache(30).sum() == 30 * 4
    assert json.loads(out.read_text())["format"] == "kvevict-head-profile"


def test_a_text_too_short_is_refused(tmp_path, capsys) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "model")
    text = tmp_path / "short.txt"
    text.write_text("def add(a, b):\n")
    assert main(["profile", "--model", str(checkpoint), "--text", str(text), "--out", str(tmp_path / "p.json")]) == 2
    assert "profiling needs at least" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_the_docstring_examples_run() -> None:
    for module in (profiling, profile_command):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
