#!/usr/bin/env python
"""Train the small offline demo causal LM shipped in ``models/demo-py``.

Everything happens offline: the training text is the CPython standard library
that ships with the interpreter running this script (``sysconfig``'s
``stdlib`` directory), the tokenizer is a byte-level BPE trained here on that
same text, and the model is a tiny Llama (GQA + RoPE) trained from scratch on
CPU under a wall-clock budget.

Usage::

    python scripts/train_demo_model.py --out models/demo-py --steps 2500 --minutes 80 --threads 1 \
        --eval-every 300 --max-val-windows 32                # ~42 min on 1 core (the shipped model)
    python scripts/train_demo_model.py --smoke                        # seconds, temp dir

The checkpoint directory gets ``config.json``, ``generation_config.json``,
``model.safetensors`` (float16), the tokenizer files, ``training_log.csv``,
``training_summary.json`` and a model card ``README.md``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- #
# Corpus
# --------------------------------------------------------------------------- #

# Directory names (anywhere in a file's relative path) that are left out: test
# suites, generated data tables (encodings, pydoc_data), GUI/demo/installer
# code and third-party packages.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "tkinter",
        "encodings",
        "pydoc_data",
        "__pycache__",
        "__phello__",
    }
)

# Held-out validation files: top-level modules present in every CPython 3.x,
# chosen by name so the split does not depend on which other files exist.
VAL_FILES = ("calendar.py", "fractions.py", "heapq.py", "shlex.py", "textwrap.py")

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS, EOS, PAD = SPECIAL_TOKENS


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(rel: Path) -> bool:
    dirs = rel.parts[:-1]
    if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs):
        return True
    return rel.name.startswith("test_")


def corpus_files(root: Path | None = None) -> list[Path]:
    """All selected stdlib ``.py`` files, sorted by relative POSIX path."""
    root = stdlib_root() if root is None else root
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not _excluded(rel) and path.is_file():
            out.append(rel)
    out.sort(key=lambda p: p.as_posix())
    return [root / p for p in out]


def read_source(path: Path) -> str | None:
    """Exact file text (newlines untouched), or None if it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def split_corpus(root: Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (train, val) lists of (relative path, text)."""
    root = stdlib_root() if root is None else root
    train, val = [], []
    for path in corpus_files(root):
        text = read_source(path)
        if not text or not text.strip():
            continue
        rel = path.relative_to(root).as_posix()
        (val if rel in VAL_FILES else train).append((rel, text))
    return train, val


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) wrapped
    for ``transformers``; ids 0/1/2 are bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    return tok


def token_byte_lengths(tok) -> torch.Tensor:
    """Number of UTF-8 bytes each token id stands for (0 for special tokens)."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2 byte<->unicode map: printable bytes map to themselves, others shifted.
    byte_of = {}
    n = 0
    for b in range(256):
        if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255):
            byte_of[chr(b)] = b
        else:
            byte_of[chr(256 + n)] = b
            n += 1
    assert set(byte_of) == set(alphabet)
    special = set(tok.all_special_ids)
    lengths = torch.zeros(len(tok), dtype=torch.float64)
    for token, idx in tok.get_vocab().items():
        if idx not in special:
            lengths[idx] = len(token)  # one vocab char == one byte
    return lengths


def encode_docs(tok, texts: list[str]) -> torch.Tensor:
    """Concatenate ``<bos> doc <eos>`` for every document into one id stream."""
    encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream: list[int] = []
    for enc in encs:
        stream.append(tok.bos_token_id)
        stream.extend(enc.ids)
        stream.append(tok.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


def count_baselines(train_ids: torch.Tensor, val_windows: torch.Tensor, vocab: int) -> dict[str, float]:
    """Validation loss (nats/token) of smoothed unigram and bigram count models
    fitted on the training stream, on the same targets as :func:`evaluate`."""
    uni = torch.bincount(train_ids, minlength=vocab).double() + 0.5
    uni /= uni.sum()
    big = torch.zeros(vocab, vocab, dtype=torch.float64)
    big.index_put_((train_ids[:-1], train_ids[1:]), torch.ones(len(train_ids) - 1, dtype=torch.float64), accumulate=True)
    big += 0.05 * vocab * uni  # additive smoothing towards the unigram
    big /= big.sum(1, keepdim=True)
    prev, tgt = val_windows[:, :-1].reshape(-1), val_windows[:, 1:].reshape(-1)
    return {
        "unigram": round(-uni[tgt].log().mean().item(), 4),
        "bigram": round(-big[prev, tgt].log().mean().item(), 4),
    }


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #


def make_config(tok, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, tok_bytes: torch.Tensor, batch: int = 16) -> tuple[float, float]:
    """Mean next-token loss (nats/token) and bits per byte over ``windows``."""
    model.eval()
    nll, ntok, nbytes = 0.0, 0, 0.0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = x[:, 1:]
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1), reduction="sum").item()
        ntok += tgt.numel()
        nbytes += tok_bytes[tgt].sum().item()
    model.train()
    return nll / ntok, nll / math.log(2) / max(nbytes, 1.0)


# Position buckets of the context-use measurement: a model that uses long context predicts tokens
# late in a window better than early ones (more of the file to copy identifiers from).
POSITION_BUCKETS = ((1, 64), (64, 256), (256, 512), (512, 1024), (1024, 2048))


@torch.no_grad()
def loss_by_position(model, windows: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Mean next-token loss (nats/token) of the targets at positions [start, end) of each window."""
    model.eval()
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        losses = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += losses.double().sum(0)
    model.train()
    mean = total / len(windows)  # mean[i]: the target at position i + 1
    return {f"{a}-{b}": round(mean[a - 1 : b - 1].mean().item(), 4)
            for a, b in POSITION_BUCKETS if b <= windows.shape[1]}


@torch.no_grad()
def greedy(model, tok, prompt: str, new_tokens: int = 80) -> str:
    model.eval()
    ids = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model.train()
    return tok.decode(out[0, 1:], skip_special_tokens=True)


def lr_at(progress: float, step: int, args) -> float:
    warm = min(1.0, (step + 1) / args.warmup_steps)
    p = min(max(progress, 0.0), 1.0)
    floor = args.lr * args.min_lr_ratio
    return warm * (floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * p)))


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default models/demo-py; temp dir with --smoke)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the whole run (default 60; 1 with --smoke)")
    p.add_argument("--steps", type=int, default=None, help="fixed step count for the cosine schedule (default: schedule by wall clock)")
    p.add_argument("--smoke", action="store_true", help="a few seconds on a tiny slice, into a temp dir (CI)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between validation passes")
    p.add_argument("--max-val-windows", type=int, default=64)
    args = p.parse_args(argv)
    if args.smoke:  # a fixed handful of short steps, so the run trains even on a busy machine
        args.steps = args.steps or 4
        args.seq_len = min(args.seq_len, 128)
        args.batch = min(args.batch, 4)
        args.warmup_steps = min(args.warmup_steps, 3)
        args.eval_every = 1e9
        args.max_val_windows = min(args.max_val_windows, 4)
    if args.minutes is None:
        args.minutes = 1.0 if args.smoke else 60.0
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="demo-py-smoke-")) if args.smoke else Path("models/demo-py")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.minutes * 60.0
    command = "python " + " ".join(shlex.quote(a) for a in [_display_path(sys.argv[0])] + list(sys.argv[1:] if argv is None else argv))

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import LlamaForCausalLM

    # ---- data ------------------------------------------------------------
    root = stdlib_root()
    train_docs, val_docs = split_corpus(root)
    if args.smoke:
        train_docs = _cap(train_docs, 150_000)
        val_docs = _cap(val_docs, 30_000)
    if len(train_docs) < 5 or not val_docs:
        raise SystemExit(f"not enough stdlib sources under {root}: {len(train_docs)} train, {len(val_docs)} val files")
    train_texts = [t for _, t in train_docs]
    val_texts = [t for _, t in val_docs]
    train_bytes = sum(len(t.encode()) for t in train_texts)
    print(f"corpus: {root} -> {len(train_docs)} train files ({train_bytes / 1e6:.2f} MB), "
          f"{len(val_docs)} val files ({', '.join(n for n, _ in val_docs)})", flush=True)

    tok = train_tokenizer(train_texts, args.vocab_size)
    tok_bytes = token_byte_lengths(tok)
    train_ids = encode_docs(tok, train_texts)
    val_ids = encode_docs(tok, val_texts)
    L = args.seq_len
    n_val = min(args.max_val_windows, len(val_ids) // L)
    val_windows = val_ids[: n_val * L].view(n_val, L)
    print(f"tokenizer: vocab {len(tok)}, {train_bytes / len(train_ids):.2f} bytes/token; "
          f"train {len(train_ids):,} tokens, val {val_windows.numel():,} tokens in {n_val} windows "
          f"[{time.time() - t0:.1f}s]", flush=True)

    baselines = count_baselines(train_ids, val_windows, len(tok))
    print(f"count baselines on val: unigram {baselines['unigram']:.3f}, bigram {baselines['bigram']:.3f} nats/token",
          flush=True)

    # ---- model -----------------------------------------------------------
    config = make_config(tok, args)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} q heads / {config.num_key_value_heads} kv heads", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)

    def epoch_batches():
        while True:
            offset = int(torch.randint(0, L, (1,), generator=gen))
            n = (len(train_ids) - offset) // L
            windows = train_ids[offset : offset + n * L].view(n, L)
            order = torch.randperm(n, generator=gen)
            for i in range(0, n - args.batch + 1, args.batch):
                yield windows[order[i : i + args.batch]]

    batches = epoch_batches()
    log_rows = []

    def log(step, lr, train_loss, tokens):
        te = time.time()
        val_loss, val_bpb = evaluate(model, val_windows, tok_bytes)
        row = {
            "step": step,
            "elapsed_s": round(time.time() - t0, 1),
            "tokens_seen": tokens,
            "lr": f"{lr:.3e}",
            "train_loss": "" if train_loss is None else round(train_loss, 4),
            "val_loss": round(val_loss, 4),
            "val_bpb": round(val_bpb, 4),
        }
        log_rows.append(row)
        tl = "   n/a" if train_loss is None else f"{train_loss:6.3f}"
        print(f"step {step:5d}  {row['elapsed_s']:7.1f}s  lr {lr:.2e}  train {tl}  val {val_loss:6.3f}  "
              f"val bpb {val_bpb:5.3f}", flush=True)
        return time.time() - te

    eval_cost = log(0, 0.0, None, 0)
    train_start = time.time()
    reserve = 2 * eval_cost + (5.0 if args.smoke else 15.0)  # final eval + save + samples
    train_end = deadline - reserve
    next_eval = train_start + args.eval_every
    step, tokens, run_loss, run_n = 0, 0, 0.0, 0
    lr = 0.0
    while True:
        now = time.time()
        if now >= train_end or (args.steps is not None and step >= args.steps):
            break
        if args.steps is not None:
            progress = step / args.steps
        else:
            progress = (now - train_start) / max(train_end - train_start, 1e-6)
        lr = lr_at(progress, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise SystemExit(f"non-finite loss at step {step}")
        step += 1
        tokens += x.numel()
        run_loss += loss.item()
        run_n += 1
        if time.time() >= next_eval:
            log(step, lr, run_loss / run_n, tokens)
            run_loss, run_n = 0.0, 0
            next_eval = time.time() + args.eval_every
    train_time = time.time() - train_start
    if run_n or log_rows[-1]["step"] != step:
        final_train = run_loss / run_n if run_n else float("nan")
        log(step, lr, final_train, tokens)
    else:  # evaluated right at the last step already
        final_train = float(log_rows[-1]["train_loss"] or "nan")
    final = log_rows[-1]
    print(f"trained {step} steps / {tokens:,} tokens in {train_time:.0f}s "
          f"({tokens / max(train_time, 1e-9):.0f} tok/s)", flush=True)

    # ---- save ------------------------------------------------------------
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    samples = {p: greedy(model, tok, p) for p in ("def ", "import os\n", "class ")}
    by_position = loss_by_position(model, val_windows)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    with open(out / "training_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log_rows[0]))
        w.writeheader()
        w.writerows(log_rows)
    summary = {
        "command": command,
        "smoke": args.smoke,
        "seed": args.seed,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "stdlib_root": str(root),
        "train_files": len(train_docs),
        "train_bytes": train_bytes,
        "train_tokens": len(train_ids),
        "train_files_sha256": hashlib.sha256("\n".join(n for n, _ in train_docs).encode()).hexdigest(),
        "val_files": [n for n, _ in val_docs],
        "val_tokens": int(val_windows.numel()),
        "params": n_params,
        "steps": step,
        "tokens_seen": tokens,
        "batch": args.batch,
        "seq_len": L,
        "train_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - t0, 1),
        "final_train_loss": round(float(final_train), 4),
        "final_val_loss": final["val_loss"],
        "final_val_bpb": final["val_bpb"],
        "uniform_loss": round(math.log(len(tok)), 4),
        "val_unigram_loss": baselines["unigram"],
        "val_bigram_loss": baselines["bigram"],
        "val_loss_by_position": by_position,
        "samples": samples,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary, config, args))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    for p, s in samples.items():
        print(f"--- greedy sample from {p!r}:\n{s}\n---")
    print(f"saved {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s total; "
          f"final train loss {float(final_train):.3f}, val loss {final['val_loss']:.3f}, val bpb {final['val_bpb']:.3f}",
          flush=True)
    return 0


def _cap(docs, max_bytes):
    out, total = [], 0
    for name, text in docs:
        if total >= max_bytes:
            break
        text = text[: max_bytes - total]
        out.append((name, text))
        total += len(text)
    return out


def _display_path(p: str) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return p


def model_card(s: dict, config, args) -> str:
    samples = "\n\n".join(
        f"Prompt `{p!r}`:\n\n```python\n{text}\n```" for p, text in s["samples"].items()
    )
    if args.steps is not None:
        schedule = f"{args.steps} steps"
        schedule_note = ("The schedule counts steps, so a rerun takes the same steps on any machine "
                         f"(within the {args.minutes:g}-minute wall-clock limit).")
    else:
        schedule = f"the wall-clock budget ({args.minutes:g} min for the whole run)"
        schedule_note = ("The schedule follows the wall clock, so a rerun on a faster or busier machine takes a "
                         "different number of steps and ends at a different loss; `--steps N` gives a step-based "
                         "schedule that does not depend on timing.")
    return f"""# demo-py: a tiny Llama trained on the Python standard library

A {s['params'] / 1e6:.1f}M-parameter causal language model that this project trains itself, offline,
so the KV-cache eviction demo runs with no network and no downloaded weights. It is a
**toy**: it has picked up the surface statistics of Python source code (indentation,
keywords, common identifiers, docstring shapes) and little more.

## Architecture

`LlamaForCausalLM`: {config.num_hidden_layers} layers, hidden {config.hidden_size}, MLP {config.intermediate_size},
{config.num_attention_heads} query heads / {config.num_key_value_heads} KV heads (GQA, head dim {config.hidden_size // config.num_attention_heads}), RoPE (theta 10000),
`max_position_embeddings` {config.max_position_embeddings}, tied input/output embeddings. Weights are stored
as float16 safetensors; load with `dtype=torch.float32` for CPU use:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("models/demo-py")
model = AutoModelForCausalLM.from_pretrained("models/demo-py", dtype=torch.float32)
ids = [tok.bos_token_id] + tok.encode("def ")
```

## Tokenizer

Byte-level BPE (GPT-2 pre-tokenisation, no normaliser), vocab {config.vocab_size}, trained with
`tokenizers` on the same training text. Special tokens: `<|bos|>`=0, `<|eos|>`=1, `<|pad|>`=2.
The tokenizer does **not** add special tokens by itself, so `decode(encode(x)) == x` exactly
for any text, whitespace included. During training every file was encoded as
`<|bos|> source <|eos|>` and the stream cut into {s['seq_len']}-token windows; prepend `bos_token_id`
to a prompt that starts a file.

## Data

The `.py` files of the CPython {s['python']} standard library found offline via
`sysconfig.get_paths()["stdlib"]` (sorted; test suites, `encodings`, `pydoc_data`,
`idlelib`, `tkinter`, `lib2to3`, `turtledemo`, `ensurepip` and `site-packages` excluded):
{s['train_files']} training files, {s['train_bytes'] / 1e6:.2f} MB, {s['train_tokens']:,} tokens.
Held out for validation: {', '.join(f'`{v}`' for v in s['val_files'])} (the first {s['val_tokens']:,} tokens
are scored). Another Python version has a different standard library, so a rerun elsewhere
trains on different text.

## Training

```
{s['command']}
```

AdamW (betas 0.9/0.95, weight decay {args.weight_decay} on matrices), peak LR {args.lr:g} with
{args.warmup_steps}-step warmup then cosine decay to {args.lr * args.min_lr_ratio:g} over {schedule}, gradient clipping 1.0, batch {s['batch']} x {s['seq_len']} tokens, seed {s['seed']},
CPU, {args.threads} torch thread(s) (torch {s['torch']}, transformers {s['transformers']}).
It ran {s['steps']} steps ({s['tokens_seen']:,} tokens, {s['tokens_seen'] / s['train_tokens']:.2f} epochs) in {s['train_seconds']:.0f} s
of training ({s['total_seconds']:.0f} s in all). {schedule_note} The learning curve (validation
about once a minute) is in `training_log.csv`.

| metric (validation: held-out files) | nats/token | bits/byte |
|---|---|---|
| final train loss (last ~minute of batches) | {s['final_train_loss']:.3f} | |
| **validation loss** | **{s['final_val_loss']:.3f}** | **{s['final_val_bpb']:.3f}** |
| smoothed bigram count model, same split | {s.get('val_bigram_loss', float('nan')):.3f} | |
| smoothed unigram count model, same split | {s.get('val_unigram_loss', float('nan')):.3f} | |
| uniform guess, ln({config.vocab_size}) | {s['uniform_loss']:.3f} | |

## Context use

Validation loss (nats/token) of the tokens at each range of positions in a {s['seq_len']}-token window:
a model that uses its context predicts late tokens better (identifiers seen earlier in the file).
Windows are cut from the stream of files, so late positions are often early in a file that
started inside the window, with little of it to look back at.

| positions | {' | '.join(s['val_loss_by_position'])} |
|---|{'---|' * len(s['val_loss_by_position'])}
| loss | {' | '.join(f'{v:.3f}' for v in s['val_loss_by_position'].values())} |

## Greedy samples

Generated at the end of training (float32, after `<|bos|>`, 80 new tokens):

{samples}

## Limits

- Tiny and under-trained: a few million parameters and a few million tokens of CPU training.
  It is only modestly better than a bigram count model, and the validation loss was still
  falling when the budget ran out (a longer `--minutes` gives a better model). Output looks
  like Python (imports, `def`/`self` lines, indented docstrings) but means nothing, and
  greedy decoding quickly falls into repetition loops.
- Trained on {s['seq_len']}-token windows. Positions up to {config.max_position_embeddings} are accepted, but
  quality degrades past ~{s['seq_len']} tokens of context (RoPE extrapolation): evaluate it at
  {s['seq_len']} tokens or fewer.
- Knows only Python standard-library style code; anything else is out of distribution.
- Not for any use beyond demos and tests of the serving / eviction machinery.
"""


if __name__ == "__main__":
    sys.exit(main())
