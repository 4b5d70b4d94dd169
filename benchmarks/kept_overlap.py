"""Do kvevict's policies keep the tokens kvpress's presses keep? Per pair (kvevict policy, kvpress
press), one-shot eviction of the same contexts at the same kept fractions, the share of the
press's kept tokens that kvevict keeps too, over every layer and KV head (min over prompts).
`kvzip` runs as KVzipPress decides: context reconstruction, one top-k over the whole model
(`global`, floor 0), so its heads keep different numbers of tokens, as KVzip's do.

    benchmarks/peers/kvpress/setup.sh          # once
    .venv/bin/python benchmarks/kept_overlap.py --model smollm2-135m-instruct --prompts suite.jsonl \\
        --limit 6 --kept 0.2 0.5

kvevict runs `answer_prompt(..., protocol="one_shot")` and records the manager's keep masks;
kvpress runs `benchmarks/peers/kvpress/kept_tokens.py` in its own environment on the same prompt
file. Both see the context alone, the same tokens (a context tokenized alone: the runners agree).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from kvevict import wire
from kvevict.evaluation.ruler_records import read_prompts
from kvevict.evaluation.suite_runner import answer_prompt
from kvevict.evaluation.runner import EvictionConfig
from kvevict.evaluation.suite_grid import RECONSTRUCT_CHUNK, method_config
from kvevict.worker.observers import RepeatPrompt
from kvevict.worker.manager_client import EmbeddedManagerClient

ROOT = Path(__file__).resolve().parent
PAIRS = (("tova", "TOVAPress"), ("tova-mean", "TOVAPress"), ("snapkv", "SnapKVPress"), ("keydiff", "KeyDiffPress"),
         ("streaming", "StreamingLLMPress"), ("kvzip", "KVzipPress"))
# Policies not run with their defaults: KVzip's queries (the raw-text repeat prompt, as the suite
# runs KVzipPress) and its model-wide top-k without floors.
CONFIGS = {"kvzip": dict(allocator="global", reconstruct=RECONSTRUCT_CHUNK, floor=0.0)}


def policy_config(policy: str, tokenizer) -> EvictionConfig:
    """The one-shot configuration a pair runs `policy` in."""
    config = method_config(policy, **CONFIGS.get(policy, {}))
    if config.reconstruct:
        config = replace(config, repeat_prompt=RepeatPrompt.from_tokenizer(tokenizer))
    return config


class _KeepRecorder(EmbeddedManagerClient):
    """The embedded manager, keeping each report's keep masks."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[dict[int, np.ndarray]] = []

    def report_block(self, request):
        response = super().report_block(request)
        self.masks.append({k.layer: layer_mask(k) for k in response.keeps})
        return response


def layer_mask(keep) -> np.ndarray:
    """A LayerKeep's (KV heads, tokens) booleans. A per-head answer concatenates its heads' masks
    (head_lengths), which one-shot eviction leaves all of the context's length."""
    mask = np.asarray(wire.decode_bits(keep.keep, "keep"), dtype=bool)
    if not keep.head_lengths:
        return mask
    if len(set(keep.head_lengths)) != 1:
        raise RuntimeError(f"layer {keep.layer}: heads of lengths {sorted(set(keep.head_lengths))}, not one context")
    return mask.reshape(len(keep.head_lengths), keep.head_lengths[0])


def kvevict_kept(model, tokenizer, records: list[dict], policies: list[str], kept: list[float]) -> dict[str, np.ndarray]:
    """`policy|id|kept|layer` -> (KV heads, context tokens) booleans after one-shot eviction."""
    out = {}
    for record in records:
        for policy in policies:
            for fraction in kept:
                recorder = _KeepRecorder()
                answer_prompt(model, tokenizer, record, policy_config(policy, tokenizer), fraction, "one_shot",
                              manager=recorder)
                if len(recorder.masks) != 1:
                    raise RuntimeError(f"one-shot eviction made {len(recorder.masks)} reports, not 1")
                for layer, mask in recorder.masks[0].items():
                    out[f"{policy}|{record['id']}|{fraction}|{layer}"] = mask
    return out


def shared_counts(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
    """(|ours & theirs|, |theirs|) over every KV head; ValueError if the masks cover different tokens."""
    if ours.shape != theirs.shape:
        raise ValueError(f"masks of shapes {ours.shape} and {theirs.shape} cover different tokens")
    return int((ours & theirs).sum()), int(theirs.sum())


def overlap(ours: np.ndarray, theirs: np.ndarray) -> float:
    """|ours & theirs| / |theirs| over every KV head: the share of their kept tokens we keep (with
    equal budgets per head, the mean of the heads' shares; a head they empty counts for nothing)."""
    both, total = shared_counts(ours, theirs)
    return both / max(total, 1)


def overlap_table(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], pairs, kept: list[float]) -> str:
    """Markdown: per pair and kept fraction, the share of their kept tokens we keep over every layer
    and head of a prompt, its mean over prompts and the lowest prompt's; and whether the press keeps
    one token set per layer (all heads alike). Pooled over layers, so a layer a model-wide top-k
    leaves few tokens weighs as little as it keeps (with equal budgets: the layers' mean)."""
    counts: dict[tuple[str, str, float], dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    shared: dict[str, list[bool]] = defaultdict(list)
    for key, mask in theirs.items():
        press, prompt, fraction, layer = key.split("|")
        shared[press].append(bool((mask == mask[:1]).all()))
        for policy, peer in pairs:
            mine = ours.get(f"{policy}|{prompt}|{fraction}|{layer}")
            if peer == press and mine is not None:
                both, total = shared_counts(mine, mask)
                cell = counts[(policy, peer, float(fraction))][prompt]
                cell[0] += both
                cell[1] += total
    lines = ["| kvevict | kvpress (one set per layer?) | " + " | ".join(f"{k:.0%} kept" for k in kept) + " |",
             "|---|---|" + "---|" * len(kept)]
    for policy, peer in pairs:
        row = []
        for fraction in kept:
            prompts = counts.get((policy, peer, fraction))
            if not prompts:
                row.append("")
                continue
            shares = [both / max(total, 1) for both, total in prompts.values()]
            row.append(f"{100 * np.mean(shares):.1f}% (lowest prompt {100 * min(shares):.1f}%)")
        one_set = "yes" if shared.get(peer) and all(shared[peer]) else "no"
        lines.append(f"| {policy} | {peer} ({one_set}) | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--pairs", nargs="+", default=None, metavar="POLICY",
                        help=f"only these kvevict policies' pairs (of {', '.join(dict.fromkeys(p for p, _ in PAIRS))})")
    parser.add_argument("--kvpress-venv", type=Path, default=ROOT / "peers" / "kvpress" / ".venv")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    pairs = PAIRS if args.pairs is None else tuple(pair for pair in PAIRS if pair[0] in args.pairs)
    if args.pairs is not None and len({p for p, _ in pairs}) != len(set(args.pairs)):
        parser.error(f"--pairs: known policies are {', '.join(dict.fromkeys(p for p, _ in PAIRS))}")
    import torch

    from kvevict.worker.model_fetch import resolve_model
    from kvevict.worker.model_loader import load_model

    python = args.kvpress_venv / "bin" / "python"
    if not python.exists():
        print(f"kept_overlap: error: no kvpress environment at {args.kvpress_venv} "
              "(benchmarks/peers/kvpress/setup.sh builds it)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    path = resolve_model(args.model)
    records = list(read_prompts(args.prompts))[: args.limit]
    with tempfile.TemporaryDirectory() as scratch:
        theirs_path = Path(scratch) / "kvpress_kept.npz"
        presses = ",".join(dict.fromkeys(peer.removesuffix("Press") for _, peer in pairs))
        subprocess.run([str(python), str(ROOT / "peers" / "kvpress" / "kept_tokens.py"), "--model", path,
                        "--prompts", str(args.prompts), "--limit", str(args.limit), "--methods", presses,
                        "--kept", ",".join(str(k) for k in args.kept), "--out", str(theirs_path)], check=True)
        theirs = dict(np.load(theirs_path))
    model, tokenizer = load_model(path, dtype="bfloat16")
    ours = kvevict_kept(model, tokenizer, records, list(dict.fromkeys(p for p, _ in pairs)), args.kept)
    table = overlap_table(ours, theirs, pairs, args.kept)
    text = (f"Share of kvpress's kept tokens that kvevict keeps too (one-shot, {len(records)} prompts of "
            f"{args.prompts.name}, every layer and KV head):\n\n{table}\n")
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
