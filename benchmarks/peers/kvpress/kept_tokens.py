"""Which context tokens each kvpress press keeps, per layer and KV head, on suite prompts: the
other half of `benchmarks/kept_overlap.py`, run in kvpress's environment.

    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/kept_tokens.py --model DIR \\
        --prompts suite.jsonl --limit 6 --methods TOVA,SnapKV,KeyDiff,StreamingLLM --kept 0.2,0.5 \\
        --out kvpress_kept.npz

The context is prefilled under the press, as `run.py` does for the question-agnostic protocol.
A press drops rows of the key cache without saying which; each kept key row is found in the keys
of an uncompressed prefill of the same context (the same kernels: the rows are bit-identical,
checked), which gives the kept positions. A press that masks per head instead (KVzip, AdaKV)
names what it masks (`masked_key_indices` of each attention module): the rest is kept. Output:
one boolean array (KV heads, context tokens) per `method|id|kept fraction|layer` key in an .npz
file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the runner beside this file: prompts, presses, budgets)


def kept_positions(compressed_keys, full_keys) -> np.ndarray:
    """(heads, L) booleans: the rows of full_keys (heads, L, d) that compressed_keys (heads, k, d)
    holds; ValueError if some kept row is not bit-identical to a full one."""
    import torch

    heads, length = full_keys.shape[:2]
    mask = np.zeros((heads, length), dtype=bool)
    for head in range(heads):
        distance = torch.cdist(compressed_keys[head].double(), full_keys[head].double(),
                               compute_mode="donot_use_mm_for_euclid_dist")
        nearest = distance.min(dim=1)
        if float(nearest.values.max()) != 0.0:
            raise ValueError(f"head {head}: a kept key matches no key of the full prefill exactly "
                             f"(distance {float(nearest.values.max()):.3g})")
        mask[head, nearest.indices.numpy()] = True
    return mask


def unmasked(attention, shape) -> np.ndarray:
    """(heads, L) booleans: the keys a head-masking press left unmasked in this attention module
    (masked_key_indices: batch, head and position index tensors; None: nothing masked)."""
    mask = np.ones(tuple(shape), dtype=bool)
    masked = getattr(attention, "masked_key_indices", None)
    if masked is not None:
        mask[masked[1].cpu().numpy(), masked[2].cpu().numpy()] = False
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--methods", default="TOVA,SnapKV,KeyDiff,StreamingLLM")
    parser.add_argument("--kept", default="0.2,0.5")
    parser.add_argument("--limit", type=int, default=6, help="the first N prompts")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    args = parser.parse_args(argv)
    methods = [run.parse_method(name) for name in run.split_methods(args.methods)]
    if any(m.needs_eager or (m.wrapper and not m.masks_heads) for m in methods):
        parser.error("--methods: presses on SDPA only (TOVA, SnapKV, KeyDiff, StreamingLLM, KVzip, AdaKV(...), ...)")
    kept = run.parse_kept(args.kept)

    import torch
    from transformers import AutoTokenizer, DynamicCache

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = run.load_model(args.model, args.dtype, "cpu", "sdpa")
    records = list(run.read_prompts(args.prompts))[: args.limit]
    layers = model.config.num_hidden_layers
    out: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for record in records:
            context, _, _ = run.split_prompt(tokenizer, record["context"], record["question"])
            ids = torch.tensor([context])
            full = DynamicCache()
            model.model(input_ids=ids, past_key_values=full)
            for method in methods:
                for fraction in kept:
                    target = round(fraction * len(context))
                    press = run.build_press(method, run.compression_ratio(method, target, len(context), layers,
                                                                          model.config.num_key_value_heads))
                    cache = DynamicCache()
                    with press(model):
                        model.model(input_ids=ids, past_key_values=cache)
                    for layer in range(layers):
                        if method.masks_heads:
                            mask = unmasked(model.model.layers[layer].self_attn, cache.layers[layer].keys.shape[1:3])
                        else:
                            mask = kept_positions(cache.layers[layer].keys[0], full.layers[layer].keys[0])
                        out[f"{method.label}|{record['id']}|{fraction}|{layer}"] = mask
            print(f"kept tokens: {record['id']}", file=sys.stderr)
    np.savez_compressed(args.out, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
