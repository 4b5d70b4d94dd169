"""NVIDIA kvpress on a suite prompt file: the same model, prompts and kept tokens as kvevict.

Runs in its own environment (`benchmarks/peers/kvpress/setup.sh` builds
`benchmarks/peers/kvpress/.venv`: kvpress 0.5.5 needs transformers <5.3) and imports nothing from
kvevict. Reads a suite JSONL prompt file (`context`, `question`, `answers`, `metric`,
`max_new_tokens`, ... per record) and appends one CSV row per (method, protocol, kept
fraction, prompt), skipping rows already in `--out`:

    benchmarks/peers/kvpress/.venv/bin/python benchmarks/peers/kvpress/run.py \\
        --model DIR --prompts suite.jsonl --kept 0.2,0.5 --protocol question_agnostic --out kvpress.csv

How a prompt runs (the steps of kvpress's `KVPressTextGenerationPipeline._forward`, called
directly because the pipeline would wrap the text in the tokenizer's chat template, and the suite
is raw completion text):

* question_agnostic (kvpress's pipeline and leaderboard): the press hooks the attention layers
  while the context alone is prefilled (`model.model(context_ids, past_key_values=cache)` inside
  `with press(model)`), so it compresses without seeing the question; the question is then fed on
  the compressed cache with positions continuing from the uncompressed context length.
* question_aware (kvpress's evaluation with `compress_questions=True`, which sets
  `context = context + question` and an empty question): the press sees the context and the
  question in one prefill, so observation-window presses (SnapKV, TOVA) score with the question's
  queries. The question's last token is held back and fed after compression, as kvpress feeds the
  question suffix, so that every answer token is computed on the compressed cache.

Budget: a kept fraction f keeps round(f * context_tokens) tokens per KV head per layer (on
average across heads for AdaKV, CriticalAdaKV and KVzip, which mask per head); the question's
tokens are not counted (question_aware: the press sees context + question[:-1] and keeps
round(f * context_tokens) + question_tokens - 1 of them). kvpress takes a `compression_ratio`
(1 - f of what it sees) and truncates `int(seen * (1 - ratio))`; the ratio passed is set so that
this truncation lands exactly on the budget, and every prompt checks what the cache really kept.

Presses: the class defaults of kvpress 0.5.5 (`--methods` names are the class names with or
without "Press"; wrappers as `CriticalKV(SnapKV)`, `AdaKV(ExpectedAttention)`). ObservedAttention
(H2O) needs eager attention (the model is loaded a second time with `attn_implementation="eager"`,
as kvpress's evaluation does); every other press runs on SDPA (AdaKV, CriticalAdaKV and KVzip
refuse eager). KVzip reconstructs the context with its "Repeat the previous context" prompt in the
same raw form (no chat-template prefix or suffix). Random draws from `torch.manual_seed(record
seed)`, so reruns agree. Decoding is greedy, stopped at the record's `max_new_tokens`, at EOS, or
at a newline after some text (the prediction is cut there).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM = "kvpress"
PROTOCOLS = ("question_agnostic", "question_aware")
CSV_COLUMNS = ("system", "method", "protocol", "kept_fraction", "id", "task", "length", "score", "prediction",
               "seconds")
RECORD_FIELDS = ("id", "task", "length", "seed", "context", "question", "answers", "metric", "max_new_tokens")
FULL_CACHE = "none"

# Scorer presses (score per token, the lowest evicted), by the name used on the command line.
BASES = ("Random", "StreamingLLM", "TOVA", "SnapKV", "ObservedAttention", "KeyDiff", "ExpectedAttention", "Knorm")
# Presses that take a scorer press as their first argument.
WRAPPERS = ("AdaKV", "CriticalKV", "CriticalAdaKV")
# Presses that are neither (they score and select on their own).
STANDALONE = ("KVzip",)
# Wrappers that mask evicted keys per head instead of shortening the cache (need SDPA, not eager).
HEAD_MASKING = ("AdaKV", "CriticalAdaKV", "KVzip")
ALIASES = {"h2o": "ObservedAttention"}
DEFAULT_METHODS = ("Random", "StreamingLLM", "TOVA", "SnapKV", "ObservedAttention", "KeyDiff", "ExpectedAttention",
                   "CriticalKV(SnapKV)", "AdaKV(SnapKV)", "KVzip")
DEFAULT_KEPT = (0.1, 0.2, 0.35, 0.5)


# --- metric (the suite's; the project has its own copy and a test checks that both agree) ---

def score(prediction: str, answers: list[str], metric: str) -> float:
    """Score of one prediction: "all" = the fraction of `answers` found as substrings (RULER's
    string_match_all: 1.0 when every one is there), "any" = 1.0 if at least one is (RULER's
    string_match_part). On the prediction stripped of whitespace, ignoring case as RULER does.

    >>> score(" 52445 is it", ["52445"], "all"), score("A b", ["a", "c"], "all"), score("a", ["b", "a"], "any")
    (1.0, 0.5, 1.0)
    """
    if metric not in ("all", "any"):
        raise ValueError(f"metric: {metric!r} is not 'all' or 'any'")
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers: a non-empty list of gold strings is needed, got {answers!r}")
    text = prediction.strip().lower()
    found = [answer.lower() in text for answer in answers]
    if metric == "all":
        return sum(found) / len(found)
    return 1.0 if any(found) else 0.0


def cut_at_stop(text: str) -> str:
    """The prediction up to the first newline that follows some non-whitespace text (the suite's
    stopping rule; leading newlines do not stop it)."""
    for match in re.finditer("\n", text):
        if text[:match.start()].strip():
            return text[:match.start()]
    return text


# --- methods ---

@dataclass(frozen=True)
class Method:
    """A press by name: `base` alone, or `wrapper(base)`; `none` is the full cache."""

    base: str
    wrapper: str | None = None

    @property
    def label(self) -> str:
        """The kvpress spelling written to the results (class names: `CriticalKVPress(SnapKVPress)`)."""
        if self.base == FULL_CACHE:
            return FULL_CACHE
        inner = f"{self.base}Press"
        return f"{self.wrapper}Press({inner})" if self.wrapper else inner

    @property
    def needs_eager(self) -> bool:
        return self.base == "ObservedAttention"

    @property
    def masks_heads(self) -> bool:
        return (self.wrapper or self.base) in HEAD_MASKING


def _canonical(name: str, allowed: Iterable[str], what: str) -> str:
    key = name.strip().lower()
    key = ALIASES.get(key, key).lower()
    if key.endswith("press"):
        key = key[: -len("press")]
    for candidate in allowed:
        if candidate.lower() == key:
            return candidate
    raise ValueError(f"--methods: unknown {what} {name!r}; known: {', '.join(allowed)}")


def parse_method(text: str) -> Method:
    """`SnapKV`, `SnapKVPress`, `snapkv`, `H2O`, `CriticalKV(SnapKV)`, `none` -> Method.

    >>> parse_method("criticalkv(SnapKVPress)").label
    'CriticalKVPress(SnapKVPress)'
    """
    text = text.strip()
    if text.lower() == FULL_CACHE:
        return Method(FULL_CACHE)
    wrapped = re.fullmatch(r"([A-Za-z0-9_]+)\s*\(\s*([A-Za-z0-9_]+)\s*\)", text)
    if wrapped:
        wrapper = _canonical(wrapped.group(1), WRAPPERS, "wrapper press")
        base = _canonical(wrapped.group(2), BASES, f"scorer press inside {wrapper}")
        method = Method(base, wrapper)
        if method.needs_eager and wrapper != "CriticalKV":
            raise ValueError(f"--methods: {text!r}: ObservedAttention needs eager attention and {wrapper} refuses it "
                             f"(kvpress asserts it); use ObservedAttention or CriticalKV(ObservedAttention)")
        return method
    if not re.fullmatch(r"[A-Za-z0-9_]+", text):
        raise ValueError(f"--methods: cannot read {text!r}; write a press name (SnapKV) or wrapper(press) "
                         f"(CriticalKV(SnapKV))")
    return Method(_canonical(text, BASES + STANDALONE, "press"))


def split_methods(text: str) -> list[str]:
    """Splits `--methods` at the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part for part in (p.strip() for p in parts) if part]


def compression_ratio(method: Method, kept: int, seen: int, n_layers: int, n_kv_heads: int) -> float:
    """The kvpress `compression_ratio` that keeps exactly `kept` of `seen` tokens per KV head per layer.
    Scorer presses (and AdaKV) keep `int(seen * (1 - ratio))`: half a token above the budget survives
    the float error of 1 - ratio. KVzip prunes `int(layers * heads * seen * ratio)` across all layers:
    half a token across them."""
    if kept >= seen:
        return 0.0
    if method.base == "KVzip":
        return (seen - kept + 0.5 / (n_layers * n_kv_heads)) / seen
    return 1.0 - (kept + 0.5) / seen


def build_press(method: Method, ratio: float) -> Any:
    """The kvpress press object for `method` with `compression_ratio=ratio` (kvpress imported here,
    so that the metric and the parsing above import without it)."""
    import kvpress

    if method.base == FULL_CACHE:
        return None
    if method.base == "KVzip":
        return _raw_text_kvzip()(compression_ratio=ratio)
    base = getattr(kvpress, f"{method.base}Press")(compression_ratio=ratio)
    if method.wrapper is None:
        return base
    return getattr(kvpress, f"{method.wrapper}Press")(base)


def _raw_text_kvzip() -> type:
    """KVzipPress whose reconstruction prompt has no chat-template prefix or suffix, as the suite's
    prompts have none (kvpress reads them from the tokenizer's chat template when it has one, and would
    then skip that many real context tokens when scoring)."""
    from kvpress import KVzipPress

    class RawTextKVzipPress(KVzipPress):
        def _perform_kvzip_compression(self, model, tokenizer):
            self.prefix_length = 0
            self._suffix_ids = tokenizer.encode("\n", return_tensors="pt", add_special_tokens=False)
            return super()._perform_kvzip_compression(model, tokenizer)

    return RawTextKVzipPress


# --- prompts and results ---

def read_prompts(path: Path) -> Iterator[dict]:
    """The generation records of a suite JSONL file (records scored without generation, such as
    metric "bpb", are skipped); a record lacking a field is refused naming the line and the field."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            missing = [field for field in RECORD_FIELDS if field not in record]
            if missing:
                raise ValueError(f"{path}:{number}: record lacks {', '.join(missing)} (see the suite format)")
            if record["metric"] not in ("all", "any"):
                continue
            if not record["answers"] or not record["question"]:
                raise ValueError(f"{path}:{number}: a record with metric {record['metric']!r} needs answers and a "
                                 f"question")
            yield record


def _kept_key(kept: float) -> str:
    return f"{float(kept):.6f}"


def done_rows(path: Path) -> set[tuple[str, str, str, str]]:
    """(method, protocol, kept, id) of the rows already in the results file (empty if there is none);
    a file with another header is refused rather than appended to."""
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ValueError(f"--out {path}: header {reader.fieldnames} is not {list(CSV_COLUMNS)}; write to a new file")
        return {(row["method"], row["protocol"], _kept_key(row["kept_fraction"]), row["id"]) for row in reader
                if row["system"] == SYSTEM}


def parse_kept(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--kept: {text!r} is not a comma-separated list of fractions (0.1,0.2)") from None
    bad = [value for value in values if not 0.0 < value < 1.0]
    if not values or bad:
        raise ValueError(f"--kept: every fraction must be in (0, 1) (the full cache, 1.0, is always run); got {text!r}")
    return values


# --- running one prompt ---

def split_prompt(tokenizer, context: str, question: str) -> tuple[list[int], list[int], bool]:
    """Token ids of the context (with the tokenizer's BOS if it adds one) and of the question, such that
    together they are the tokenization of context + question when the boundary falls between tokens;
    otherwise (a token would straddle it) the two are tokenized apart, as kvpress's pipeline does, and
    the flag says so."""
    joint = tokenizer(context + question)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    if joint[: len(context_ids)] == context_ids and len(joint) > len(context_ids):
        return context_ids, joint[len(context_ids):], False
    return context_ids, tokenizer(question, add_special_tokens=False)["input_ids"], True


def kept_per_head(model, cache) -> float:
    """Mean tokens per KV head per layer in the cache, not counting keys a press masked per head."""
    layers = model.model.layers
    n_kv_heads = model.config.num_key_value_heads
    total = 0
    for index, layer in enumerate(layers):
        length = cache.layers[index].keys.shape[2]
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        total += length * n_kv_heads - (0 if masked is None else int(masked[0].numel()))
    return total / (len(layers) * n_kv_heads)


@dataclass
class Outcome:
    prediction: str
    seconds: float
    context_tokens: int
    question_tokens: int
    seen_tokens: int
    target_kept: int
    kept_per_head: float
    straddled: bool


def run_prompt(model, tokenizer, record: dict, method: Method, kept_fraction: float, protocol: str) -> Outcome:
    """Prefill under the press, then greedy decoding on the compressed cache (see the module docstring)."""
    import torch
    from transformers import DynamicCache

    context_ids, question_ids, straddled = split_prompt(tokenizer, record["context"], record["question"])
    device = model.device
    if protocol == "question_agnostic":
        prefill, rest = context_ids, question_ids
    else:
        prefill, rest = context_ids + question_ids[:-1], question_ids[-1:]
    seen = len(prefill)
    target = seen if method.base == FULL_CACHE else round(kept_fraction * len(context_ids)) + seen - len(context_ids)
    press = build_press(method, compression_ratio(method, target, seen, model.config.num_hidden_layers,
                                                  model.config.num_key_value_heads))
    torch.manual_seed(int(record["seed"]))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)

    start = time.perf_counter()
    cache = DynamicCache()
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=torch.tensor([prefill], device=device), past_key_values=cache)
    kept = kept_per_head(model, cache)
    if not math.isclose(kept, target, abs_tol=1e-6):
        raise RuntimeError(f"{method.label} kept {kept:.3f} tokens per KV head per layer of {seen}, not the budget "
                           f"{target} (kept fraction {kept_fraction}, record {record['id']})")
    # Positions go on from the uncompressed length, as in kvpress's pipeline.
    position_ids = torch.arange(seen, seen + len(rest), device=device).unsqueeze(0)
    outputs = model(input_ids=torch.tensor([rest], device=device), past_key_values=cache, position_ids=position_ids,
                    logits_to_keep=1)
    generated: list[int] = []
    text = ""
    next_position = seen + len(rest)
    for step in range(int(record["max_new_tokens"])):
        token = int(outputs.logits[0, -1].argmax())
        if token in eos_ids:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if cut_at_stop(text) != text or step == int(record["max_new_tokens"]) - 1:
            break
        outputs = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                        position_ids=torch.tensor([[next_position]], device=device))
        next_position += 1
    seconds = time.perf_counter() - start
    return Outcome(cut_at_stop(text), seconds, len(context_ids), len(question_ids), seen, target, kept, straddled)


# --- the run ---

def load_model(path: str, dtype: str, device: str, attn_implementation: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    return model.to(device).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    parser.add_argument("--prompts", required=True, type=Path, help="a suite JSONL prompt file")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated presses (default: {','.join(DEFAULT_METHODS)}); the full cache "
                             f"(none, kept 1.0) always runs")
    parser.add_argument("--kept", default=",".join(str(k) for k in DEFAULT_KEPT),
                        help="kept fractions f of the context (compression_ratio = 1 - f); default 0.1,0.2,0.35,0.5")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="question_agnostic")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--limit", type=int, default=None, help="only the first N generation records")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", required=True, type=Path, help="results CSV (appended; rows already there are skipped)")
    parser.add_argument("--budget-log", type=Path, default=None,
                        help="also append per prompt a JSON line with the context, question, budget and kept tokens")
    args = parser.parse_args(argv)
    try:
        args.method_list = [parse_method(name) for name in split_methods(args.methods)]
        args.kept_list = parse_kept(args.kept)
    except ValueError as error:
        parser.error(str(error))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit: must be a positive number of records")
    if not args.prompts.is_file():
        parser.error(f"--prompts: {args.prompts} is not a file")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model: {args.model} is not a checkpoint directory (no config.json)")
    return args


def plan(methods: list[Method], kept: list[float]) -> list[tuple[Method, float]]:
    """(method, kept fraction) pairs to run: the full cache first, then each press at each fraction."""
    pairs = [(Method(FULL_CACHE), 1.0)]
    for method in methods:
        if method.base != FULL_CACHE:
            pairs += [(method, fraction) for fraction in kept]
    return list(dict.fromkeys(pairs))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = list(read_prompts(args.prompts))
        done = done_rows(args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.limit is not None:
        records = records[: args.limit]
    todo = [(method, fraction, record) for method, fraction in plan(args.method_list, args.kept_list)
            for record in records
            if (method.label, args.protocol, _kept_key(fraction), record["id"]) not in done]
    print(f"{len(records)} prompts, {len(todo)} rows to run ({len(done)} already in {args.out})", file=sys.stderr)
    if not todo:
        return 0

    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    models: dict[str, Any] = {}
    new_file = not args.out.exists() or args.out.stat().st_size == 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    straddled = 0
    with args.out.open("a", newline="", encoding="utf-8") as handle, torch.inference_mode():
        writer = csv.writer(handle)
        if new_file:
            writer.writerow(CSV_COLUMNS)
        bar = tqdm(todo, desc="kvpress", unit="prompt")
        for method, fraction, record in bar:
            bar.set_postfix_str(f"{method.label} f={fraction}")
            attention = "eager" if method.needs_eager else "sdpa"
            if attention not in models:
                models[attention] = load_model(args.model, args.dtype, device, attention)
            outcome = run_prompt(models[attention], tokenizer, record, method, fraction, args.protocol)
            straddled += outcome.straddled
            writer.writerow([SYSTEM, method.label, args.protocol, fraction, record["id"], record["task"],
                             record["length"], score(outcome.prediction, record["answers"], record["metric"]),
                             outcome.prediction, f"{outcome.seconds:.4f}"])
            handle.flush()
            if args.budget_log is not None:
                with args.budget_log.open("a", encoding="utf-8") as log:
                    log.write(json.dumps({"method": method.label, "protocol": args.protocol, "kept_fraction": fraction,
                                          "id": record["id"], "context_tokens": outcome.context_tokens,
                                          "question_tokens": outcome.question_tokens, "seen_tokens": outcome.seen_tokens,
                                          "target_kept": outcome.target_kept,
                                          "kept_per_head": outcome.kept_per_head}) + "\n")
    if straddled:
        print(f"note: in {straddled} rows a token straddled the context/question boundary; context and question "
              f"were tokenized apart", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
