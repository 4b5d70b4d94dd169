"""`kvevict profile --model M --text FILE --out FILE`: measures, on one profiling text, what the
per-head allocators `lukv` and `epicache` read (kvevict.cache_manager.head_budgets.HeadProfile):

* LU-KV utility curves per (layer, KV head): one forward with eager attention, whose attention
  modules return their probabilities (what output_attentions=True collects); a forward hook
  reduces each layer's (query heads, tokens, tokens) probabilities to curves at once
  (kvevict.profiling.layer_utility), so memory holds one layer's, not every layer's (30 layers x
  9 heads x 4,096^2 float32 would be 18 GB);
* EpiCache's layer sensitivity: a second forward with EpiCache's restricted mask (blocks, their
  overlap and sink tokens), its keys compared with the first's (kvevict.profiling.key_similarity).

The command module imports neither torch nor transformers until it runs (`kvevict --help` stays fast).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kvevict.cache_manager.head_budgets import ADAHEAD_ALPHA, HeadProfile, head_floor, load_profile, save_profile
from kvevict.cli_options import DTYPES
from kvevict.profiling import DEFAULT_GRID, METRICS, OVERLAP_RATIO, SIMILARITY_WINDOW

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

DEFAULT_MAX_TOKENS = 4096
DEFAULT_FUTURE = 128
DEFAULT_PROBES = 8
DEFAULT_SINK = 128  # EpiCache's sink tokens in its restricted mask
SUMMARY_FRACTIONS = (0.1, 0.2)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers `profile`.

    >>> parser = argparse.ArgumentParser()
    >>> add_commands(parser.add_subparsers(dest="command"))
    >>> parser.parse_args(["profile", "--model", "m", "--text", "t.txt", "--out", "p.json"]).future
    128
    """
    parser = subparsers.add_parser(
        "profile", help="profile a model's per-head utility curves and layer sensitivity (lukv, epicache budgets)",
        description="Runs --text through --model with eager attention and writes, as JSON, LU-KV utility curves "
                    "per (layer, KV head) (the share of the text's future attention contribution each head keeps "
                    "at each kept fraction of its cache) and EpiCache's per-layer key sensitivity. The per-head "
                    "allocators lukv and epicache read the file (docs/HEAD_BUDGETS.md).")
    parser.add_argument("--model", required=True, help="checkpoint directory, hub id or known model name")
    parser.add_argument("--text", type=Path, required=True, help="profiling text (UTF-8)")
    parser.add_argument("--out", type=Path, required=True, help="profile file to write (JSON)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="profile the text's first N tokens (memory: one layer's attention, query heads x "
                             "N^2 x 4 bytes, and eager attention's intermediates; default: %(default)s)")
    parser.add_argument("--future", type=int, default=DEFAULT_FUTURE,
                        help="tokens after each cut that play the decoding steps (default: %(default)s)")
    parser.add_argument("--probes", type=int, default=DEFAULT_PROBES,
                        help="cut points, evenly spaced from half the text to its end (default: %(default)s)")
    parser.add_argument("--metric", default="snapkv", choices=METRICS,
                        help="what a head keeps first at a cut: the policy the curves are for (default: %(default)s)")
    parser.add_argument("--attention-only", action="store_true",
                        help="importance from attention alone, without the norms of the values through W_O")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip EpiCache's second forward")
    parser.add_argument("--block", type=int, default=0,
                        help="EpiCache mask's block in tokens (default: a quarter of the text, EpiCache's 4,096 "
                             "of 16K)")
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK,
                        help="EpiCache mask's sink tokens, at most a quarter of the block (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on <= 2 cores)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.set_defaults(run=_run)


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's attention modules in layer order (those transformers gives a layer_idx).

    >>> from transformers import LlamaConfig
    >>> from kvevict.worker.model_loader import model_from_config
    >>> model = model_from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
    ...                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> [type(m).__name__ for m in attention_modules(model)]
    ['LlamaAttention', 'LlamaAttention']
    """
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    modules.sort(key=lambda m: m.layer_idx)
    if [m.layer_idx for m in modules] != list(range(len(modules))) or not modules:
        raise ValueError(f"{type(model).__name__}: cannot find one attention module per layer to profile")
    return modules


def value_norms(module: torch.nn.Module, values: torch.Tensor) -> np.ndarray:
    """||W_O^(a) v_j|| (kv_heads, group, tokens) for values (kv_heads, tokens, head_dim): the size
    of token j's value after query head a's slice of the output projection.

    >>> import torch
    >>> from transformers import LlamaConfig
    >>> from kvevict.worker.model_loader import model_from_config
    >>> model = model_from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
    ...                                       num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    >>> value_norms(attention_modules(model)[0], torch.ones(2, 5, 8)).shape
    (2, 2, 5)
    """
    import torch

    from kvevict.worker.query_errors import output_projection

    heads, _, head_dim = values.shape
    weight = output_projection(module).detach().float()  # (d_model, Hq * d)
    slices = weight.t().reshape(-1, head_dim, weight.shape[0])  # (Hq, d, d_model)
    slices = slices.reshape(heads, -1, head_dim, weight.shape[0])
    with torch.no_grad():
        projected = torch.einsum("hsd,hgdm->hgsm", values.float(), slices)
        return torch.linalg.vector_norm(projected, dim=-1).numpy()


def profile_model(model: PreTrainedModel, input_ids: torch.Tensor, *, future: int = DEFAULT_FUTURE,
                  probes: int = DEFAULT_PROBES, metric: str = "snapkv", grid: np.ndarray = DEFAULT_GRID,
                  use_value_norms: bool = True, sensitivity: bool = True, block: int = 0,
                  sink: int = DEFAULT_SINK) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Curves (layers, kv_heads, grid), layer similarity (layers,) (empty without `sensitivity`)
    and the settings measured with, for `input_ids` (1, tokens) through `model` (switched to
    eager attention for good).

    >>> import torch
    >>> from transformers import LlamaConfig
    >>> from kvevict.worker.model_loader import model_from_config
    >>> model = model_from_config(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
    ...                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> curves, similarity, settings = profile_model(model, torch.arange(100)[None] % 50, future=8, probes=2)
    >>> curves.shape, similarity.shape, settings["cuts"]
    ((2, 2, 66), (2,), [64, 92])
    """
    import torch

    from kvevict import profiling
    from kvevict.worker.model_loader import geometry_of

    geometry = geometry_of(model)
    length = int(input_ids.shape[1])
    cuts = profiling.probe_cuts(length, future, probes)
    model.set_attn_implementation("eager")
    if model.config._attn_implementation != "eager":
        raise ValueError(f"{type(model).__name__} refused eager attention; profiling reads its probabilities")
    modules = attention_modules(model)
    kv_heads, query_heads = geometry.num_kv_heads, geometry.num_query_heads
    layers: dict[int, profiling.LayerUtility] = {}

    def reduce_layer(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        probs, cache = output[1], kwargs.get("past_key_values")
        if probs is None or cache is None:
            raise ValueError(f"{type(module).__name__} returned no attention probabilities or got no cache: "
                             "this architecture cannot be profiled")
        probs = probs[0].detach().float().reshape(kv_heads, query_heads // kv_heads, length, length).numpy()
        norms = value_norms(module, cache.layers[module.layer_idx].values[0]) if use_value_norms else None
        layers[module.layer_idx] = profiling.layer_utility(probs, cuts, future, metric, norms, grid)

    started = time.perf_counter()
    hooks = [m.register_forward_hook(reduce_layer, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            full = model(input_ids, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    curves = profiling.normalize_curves([layers[i] for i in range(len(modules))])
    settings: dict[str, Any] = {
        "tokens": length, "cuts": cuts, "future": future, "metric": metric, "value_norms": use_value_norms,
        "gqa": "group mean over the query heads of a KV head",
        "curves_seconds": round(time.perf_counter() - started, 1),
    }
    similarity = np.zeros(0)
    if sensitivity:
        if any(geometry.sliding_windows):
            raise ValueError("EpiCache's restricted mask replaces the sliding windows of this model's layers; "
                             "profile it with --no-sensitivity")
        block = block or max(1, math.ceil(length / 4))
        sink = min(sink, block // 4)
        overlap = int(block * OVERLAP_RATIO)
        started = time.perf_counter()
        visible = torch.from_numpy(profiling.block_mask(length, block, sink, overlap)).to(input_ids.device)
        mask = torch.zeros((1, 1, length, length), dtype=model.dtype, device=input_ids.device)
        mask.masked_fill_(~visible, torch.finfo(model.dtype).min)
        with torch.no_grad():
            restricted = model(input_ids, attention_mask=mask, use_cache=True)

        def keys(cache: Any) -> list[np.ndarray]:
            return [layer.keys[0].float().cpu().numpy() for layer in cache.layers]

        similarity = profiling.key_similarity(keys(full.past_key_values), keys(restricted.past_key_values))
        settings["sensitivity"] = {"recipe": "EpiCache: keys with full attention vs a block mask",
                                   "block": block, "sink": sink, "overlap": overlap, "window": SIMILARITY_WINDOW,
                                   "seconds": round(time.perf_counter() - started, 1)}
    return curves, similarity, settings


def summarize(profile: HeadProfile, length: int, fractions: tuple[float, ...] = SUMMARY_FRACTIONS) -> list[str]:
    """How unequal the per-head budgets come out at each kept fraction of a `length`-token cache.

    >>> profile = HeadProfile(model="m", grid=(0.0, 0.5, 1.0), curves=np.array([[[0., .6, .6], [0., .2, .4]]]))
    >>> summarize(profile, 100, (0.2,))[0].startswith("lukv at 20% (20 tokens/head)")
    True
    """
    lines = []
    for fraction in fractions:
        tokens = max(1, round(fraction * length))
        budgets = profile.lukv(tokens, length).astype(np.float64)
        floor = head_floor(tokens, ADAHEAD_ALPHA, length)
        ratio = budgets / tokens
        lines.append(f"lukv at {fraction:.0%} ({tokens} tokens/head): per-head budget / uniform min "
                     f"{ratio.min():.2f} median {np.median(ratio):.2f} max {ratio.max():.2f}, coefficient of "
                     f"variation {budgets.std() / budgets.mean():.2f}, {int((budgets <= floor).sum())} of "
                     f"{budgets.size} heads at the floor; per layer (mean over its heads) min "
                     f"{ratio.mean(axis=1).min():.2f} max {ratio.mean(axis=1).max():.2f}")
        if profile.sensitivity:
            layer = profile.epicache(tokens)[:, 0] / tokens
            lines.append(f"epicache at {fraction:.0%}: per-layer budget / uniform min {layer.min():.2f} "
                         f"max {layer.max():.2f}")
    return lines


def _run(args: argparse.Namespace) -> int:
    import torch

    import kvevict
    from kvevict.worker.model_loader import default_threads

    torch.set_num_threads(args.threads or default_threads())
    text = args.text.read_text(encoding="utf-8")
    started = time.perf_counter()
    model, tokenizer = kvevict.load_model(args.model, device=args.device, dtype=args.dtype,
                                          trust_remote_code=args.trust_remote_code)
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :args.max_tokens].to(model.device)
    curves, similarity, settings = profile_model(
        model, input_ids, future=args.future, probes=args.probes, metric=args.metric,
        use_value_norms=not args.attention_only, sensitivity=not args.no_sensitivity, block=args.block,
        sink=args.sink)
    settings.update({"text": args.text.name, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
                     "checkpoint": str(getattr(model.config, "_name_or_path", "")),
                     "model_type": model.config.model_type, "dtype": args.dtype,
                     "seconds": round(time.perf_counter() - started, 1)})
    profile = HeadProfile(model=args.model, grid=tuple(DEFAULT_GRID), curves=curves,
                          sensitivity=tuple(similarity), settings=settings)
    size = save_profile(profile, args.out)
    load_profile(args.out)  # what was written reads back
    print(f"{args.out}: {profile.num_layers} layers x {profile.num_kv_heads} KV heads x {len(profile.grid)} kept "
          f"fractions, {input_ids.shape[1]} tokens, {len(settings['cuts'])} probes, {size} bytes, "
          f"{settings['seconds']} s")
    for line in summarize(profile, int(input_ids.shape[1])):
        print(line)
    sys.stdout.flush()
    return 0
