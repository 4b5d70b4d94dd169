"""A RULER-style suite for a real model: generate the prompt file, check it with the full cache.

`generate` writes the prompt file (JSONL, one record per prompt; `kvevict.evaluation.ruler_records`)
from local text and a seed, with lengths in tokens of the model's tokenizer, and prints how many
records and tokens each task x length got. The same arguments give the same bytes (with the same
CPython, whose manual and standard library are the text).

    .venv/bin/python benchmarks/ruler_suite.py generate --model ~/.cache/kvevict/models/smollm2-135m-instruct \\
        --lengths 1024 2048 4096 --n 8 --seeds 0 1 2 --out suite.jsonl

With several seeds each draws `--n` records per task and length; their indices run on from seed
to seed (seed 0 gets 0..n-1, the next n..2n-1), so ids stay unique and a seed's records are
those a file of that seed alone would hold at those indices.

`full-cache` answers every record with plain `transformers` (`model.generate`, greedy, the whole
cache; no kvevict), so a suite's tasks can be told apart into those the model can do and those it
cannot before any eviction. The prompt is `context + question` as raw text (the tokenizer's BOS if
it adds one); generation stops at `max_new_tokens`, EOS, or a newline after some text, and the
prediction is cut there; `text_bpb` records are scored by teacher forcing (bits per byte). It
writes the results file (system `transformers`, method `full`, protocol `one_shot`, kept fraction
1) and prints accuracy per task x length with n and the standard error, and seconds per prompt.

    .venv/bin/python benchmarks/ruler_suite.py full-cache --model ~/.cache/kvevict/models/smollm2-135m-instruct \\
        --prompts suite.jsonl --out full_cache.csv --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from kvevict.evaluation.ruler import TASKS, make_records
from kvevict.evaluation.ruler_fit import token_counter
from kvevict.evaluation.ruler_records import read_prompts, write_prompts
from kvevict.evaluation.suite_metric import cut_prediction, score

RESULT_FIELDS = ("system", "method", "protocol", "kept_fraction", "id", "task", "length", "score", "prediction",
                 "seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write the prompt file")
    gen.add_argument("--model", required=True, help="directory (or hub id) of the tokenizer that measures lengths")
    gen.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                     help=f"tasks (default all: {' '.join(TASKS)})")
    gen.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096], help="prompt lengths in tokens")
    gen.add_argument("--n", type=int, default=24, help="records per task and length")
    gen.add_argument("--seeds", type=int, nargs="+", default=[0], help="generator seeds, --n records each")
    gen.add_argument("--out", required=True, help="the prompt file to write (.jsonl)")
    full = commands.add_parser("full-cache", help="answer a prompt file with transformers and the full cache")
    full.add_argument("--model", required=True)
    full.add_argument("--prompts", required=True, help="a prompt file written by `generate`")
    full.add_argument("--out", required=True, help="the results file to write (.csv)")
    full.add_argument("--tasks", nargs="+", help="only these tasks")
    full.add_argument("--lengths", nargs="+", type=int, help="only these lengths")
    full.add_argument("--device", default="cpu")
    full.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    full.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.n < 1:
            parser.error(f"--n: at least 1 record per task and length, got {args.n}")
        if min(args.lengths) < 1:
            parser.error(f"--lengths: lengths are positive token counts, got {args.lengths}")
        if min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds):
            parser.error(f"--seeds: distinct non-negative integers, got {args.seeds}")
        if not args.out.endswith(".jsonl"):
            parser.error(f"--out: the prompt file is JSONL, name it *.jsonl (got {args.out})")
    return args


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    local = Path(model).expanduser()
    return AutoTokenizer.from_pretrained(str(local) if local.exists() else model)


# -- generate -------------------------------------------------------------------------------------
def generate(tokenizer, tasks: list[str], lengths: list[int], n: int, seeds: list[int]) -> list[dict]:
    """Every record, task by task, length by length, seed by seed (n indices each, running on)."""
    return make_records(tokenizer, tasks, lengths, n, seeds)


def generation_table(records: list[dict], tokenizer) -> str:
    """task x length -> records and mean prompt tokens (min-max)."""
    count = token_counter(tokenizer)
    cells: dict[tuple[str, int], list[int]] = defaultdict(list)
    for record in records:
        cells[record["task"], record["length"]].append(count(record["context"] + record["question"]))
    lengths = sorted({length for _, length in cells})
    tasks = list(dict.fromkeys(task for task, _ in cells))
    lines = ["| task | " + " | ".join(f"{length}: records, mean tokens (min-max)" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task in tasks:
        row = []
        for length in lengths:
            tokens = cells.get((task, length), [])
            row.append(f"{len(tokens)}, {np.mean(tokens):.0f} ({min(tokens)}-{max(tokens)})" if tokens else "-")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- full cache -----------------------------------------------------------------------------------
class _NewlineAfterText:
    """A stopping criterion: stop once the generated text has a newline after some text."""

    def __init__(self, tokenizer, prompt_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_tokens:], skip_special_tokens=True)
        done = cut_prediction(text) != text
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def answer(model, tokenizer, record: dict, device: str) -> tuple[float, str]:
    """(score, prediction) of one record with the full cache; bits per byte for `bpb` records."""
    import torch
    from transformers import StoppingCriteriaList

    ids = torch.tensor([tokenizer(record["context"] + record["question"], verbose=False)["input_ids"]], device=device)
    with torch.inference_mode():
        if record["metric"] == "bpb":
            logits = model(ids).logits[0, :-1].float()
            nats = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            first = tokenizer.decode(ids[0, :1])  # the first token is not predicted (unless it is a BOS)
            predicted_bytes = len(record["context"].encode("utf-8")) - len(first.encode("utf-8"))
            return nats / math.log(2) / max(predicted_bytes, 1), ""
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=record["max_new_tokens"],
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             stopping_criteria=StoppingCriteriaList([_NewlineAfterText(tokenizer, ids.shape[1])]))
    prediction = cut_prediction(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return score(prediction, record["answers"], record["metric"]), prediction


def accuracy_table(rows: list[dict]) -> str:
    """task x length -> mean score +- standard error (n), and seconds per prompt."""
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        cells[row["task"], int(row["length"])].append(row)
    lengths = sorted({length for _, length in cells})
    tasks = list(dict.fromkeys(task for task, _ in cells))
    lines = ["| task | " + " | ".join(f"{length}: score +- se (n), s/prompt" for length in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task in tasks:
        row = []
        for length in lengths:
            got = cells.get((task, length), [])
            if not got:
                row.append("-")
                continue
            scores = np.asarray([float(r["score"]) for r in got])
            se = scores.std(ddof=1) / math.sqrt(len(scores)) if len(scores) > 1 else float("nan")
            unit = " bpb" if task == "text_bpb" else ""
            row.append(f"{scores.mean():.3f}{unit} +- {se:.3f} ({len(scores)}), "
                       f"{np.mean([float(r['seconds']) for r in got]):.1f}")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def full_cache(args: argparse.Namespace) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    records = [r for r in read_prompts(args.prompts) if (not args.tasks or r["task"] in args.tasks)
               and (not args.lengths or r["length"] in args.lengths)]
    if not records:
        raise SystemExit(f"--prompts {args.prompts}: no record of the asked tasks and lengths")
    path = str(Path(args.model).expanduser())
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    rows = []
    with open(args.out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        for i, record in enumerate(records):
            started = time.perf_counter()
            value, prediction = answer(model, tokenizer, record, args.device)
            row = {"system": "transformers", "method": "full", "protocol": "one_shot", "kept_fraction": 1.0,
                   "id": record["id"], "task": record["task"], "length": record["length"], "score": value,
                   "prediction": prediction, "seconds": round(time.perf_counter() - started, 3)}
            writer.writerow(row)
            handle.flush()
            rows.append(row)
            print(f"[{i + 1}/{len(records)}] {record['id']} score {value:.3f} {row['seconds']:.1f}s "
                  f"{prediction[:60]!r}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "generate":
        tokenizer = load_tokenizer(args.model)
        started = time.perf_counter()
        try:
            records = generate(tokenizer, args.tasks, args.lengths, args.n, args.seeds)
        except ValueError as error:  # a task that cannot reach a length with this tokenizer
            print(f"error: {error}", file=sys.stderr)
            return 2
        count = write_prompts(records, args.out)
        print(generation_table(records, tokenizer))
        print(f"\n{count} records -> {args.out} ({time.perf_counter() - started:.1f} s)")
    else:
        rows = full_cache(args)
        print(accuracy_table(rows))
        print(f"\n{len(rows)} results -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
