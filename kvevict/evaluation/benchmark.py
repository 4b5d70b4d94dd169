"""The quality benchmark: every configuration at every budget on every seed's prompts.

Two tasks, each on its own model:
* `retrieval`: a retrieval checkpoint's own task (`retrieval_task.json`, e.g. models/retrieval),
  or facts rendered as text inside a text file for any other model; metric: questions answered
  exactly after the context was evicted to the budget, and whether the answers' tokens survived;
* `text`: bits per byte of held-out text windows under eviction, and the gap to the full cache.

A seed fixes the prompts (examples, windows) and the random policy's draws, so every
configuration of a seed sees the same prompts and differences between them are paired.
"""

from __future__ import annotations

import json
import os
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kvevict.evaluation.grid import budget_tokens
from kvevict.evaluation.report import RETRIEVAL, TEXT, Row
from kvevict.evaluation.retrieval_task import TASK_FILE, RetrievalExample, RetrievalTask
from kvevict.evaluation.runner import (FULL_CACHE, FULL_CACHE_BUDGET, EvictionConfig, evaluate_retrieval,
                                       evaluate_text)
from kvevict.evaluation.text_retrieval import TextRetrievalTask

TASKS = (RETRIEVAL, TEXT)
REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout, when running from one


@dataclass(frozen=True)
class Plan:
    """What to measure. Models are local checkpoint directories or hub ids."""

    configs: tuple[EvictionConfig, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    tasks: tuple[str, ...] = TASKS
    retrieval_model: str = "models/retrieval"
    text_model: str = "models/demo-py"
    text_file: str | None = None  # text windows (and the haystack of text-rendered retrieval)
    context_tokens: int = 1024
    block_size: int = 64
    examples: int = 16  # retrieval prompts per seed
    questions: int = 8  # per retrieval prompt
    facts: int | None = None  # per retrieval prompt (asked and distractors); None: the task's density
    windows: int = 8  # text windows per seed
    device: str = "cpu"
    dtype: str = "float32"

    def runs(self) -> list[tuple[str, EvictionConfig, float, int]]:
        """(task, config, budget fraction, seed) of every measurement, full-cache references first."""
        out = [(task, FULL_CACHE, 1.0, seed) for task in self.tasks for seed in self.seeds]
        out += [(task, config, budget, seed) for task in self.tasks for seed in self.seeds
                for config in self.configs for budget in self.budgets]
        return out


# -- prompts ----------------------------------------------------------------------------------
def stdlib_heldout_text(model_dir: Path) -> str | None:
    """The held-out standard-library files a demo-py-style checkpoint names in its summary."""
    summary = Path(model_dir) / "training_summary.json"
    if not summary.is_file():
        return None
    names = json.loads(summary.read_text()).get("val_files")
    if not names:
        return None
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text(encoding="utf-8") for name in names if (root / name).is_file()]
    return "\n".join(texts) or None


def load_text(plan: Plan, model: str) -> str:
    if plan.text_file:
        return Path(plan.text_file).read_text(encoding="utf-8")
    text = stdlib_heldout_text(Path(model)) if Path(model).is_dir() else None
    if text is None:
        raise ValueError(f"{model}: names no held-out text (training_summary.json val_files); pass --text-file")
    return text


def text_windows(token_ids: torch.Tensor, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` windows of `length` tokens at seeded offsets (distinct where the text allows)."""
    if token_ids.numel() < length + 1:
        raise ValueError(f"the text has {token_ids.numel()} tokens; a window needs {length}")
    rng = np.random.default_rng([seed, 7])
    starts = rng.choice(token_ids.numel() - length + 1, size=count, replace=count > token_ids.numel() - length + 1)
    return [token_ids[s: s + length] for s in starts]


def retrieval_examples(task: RetrievalTask | TextRetrievalTask, context_tokens: int, questions: int, count: int,
                       seed: int, facts: int | None = None) -> list[RetrievalExample]:
    rng = np.random.default_rng([seed, 11])
    return [task.example(rng, context_tokens, questions, facts=facts) for _ in range(count)]


def model_label(name: str) -> str:
    """How results name a model: a hub id as given, a checkout's own checkpoint by its path in the
    repository (`models/retrieval`), so that results read the same on every machine."""
    path = Path(name)
    if not path.exists():
        return name
    try:
        return str(path.resolve().relative_to(REPOSITORY))
    except ValueError:
        return name


# -- measuring --------------------------------------------------------------------------------
@dataclass
class _Loaded:
    model: torch.nn.Module
    tokenizer: object
    prompts: dict[int, list] = field(default_factory=dict)  # seed -> examples or windows


class Measurer:
    """Loads each task's model, the retrieval task and the tokenized text once, and measures runs
    on them (one per process)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._tasks: dict[str, _Loaded] = {}
        self._retrieval_task: RetrievalTask | TextRetrievalTask | None = None
        self._text_ids: torch.Tensor | None = None

    def _load(self, task: str) -> _Loaded:
        if task not in self._tasks:
            from kvevict.worker.model_loader import load_model

            name = self.plan.retrieval_model if task == RETRIEVAL else self.plan.text_model
            model, tokenizer = load_model(name, device=self.plan.device, dtype=self.plan.dtype)
            self._tasks[task] = _Loaded(model, tokenizer)
        return self._tasks[task]

    def _prompts(self, task: str, seed: int) -> list:
        loaded = self._load(task)
        if seed not in loaded.prompts:
            plan = self.plan
            if task == RETRIEVAL:
                loaded.prompts[seed] = retrieval_examples(self.retrieval_task(), plan.context_tokens, plan.questions,
                                                          plan.examples, seed, plan.facts)
            else:
                if self._text_ids is None:
                    self._text_ids = torch.as_tensor(loaded.tokenizer(
                        load_text(plan, plan.text_model), add_special_tokens=False, verbose=False).input_ids,
                        dtype=torch.long)
                loaded.prompts[seed] = text_windows(self._text_ids, plan.context_tokens, plan.windows, seed)
        return loaded.prompts[seed]

    def retrieval_task(self) -> RetrievalTask | TextRetrievalTask:
        if self._retrieval_task is None:
            name = self.plan.retrieval_model
            if Path(name, TASK_FILE).is_file():
                self._retrieval_task = RetrievalTask.load(Path(name))
            else:  # tokenizes the whole text file: once per process
                self._retrieval_task = TextRetrievalTask(self._load(RETRIEVAL).tokenizer, load_text(self.plan, name))
        return self._retrieval_task

    def measure(self, task: str, config: EvictionConfig, fraction: float, seed: int) -> Row:
        plan = self.plan
        loaded = self._load(task)
        prompts = self._prompts(task, seed)
        budget = FULL_CACHE_BUDGET if config is FULL_CACHE or fraction >= 1.0 else budget_tokens(
            fraction, plan.context_tokens)
        settings = config.settings(budget, plan.block_size, seed=seed)
        name = plan.retrieval_model if task == RETRIEVAL else plan.text_model
        row = Row(task=task, model=model_label(name), policy=config.name, base=config.base, wrapper=config.wrapper,
                  allocator=config.allocator, budget_fraction=fraction,
                  budget_tokens=plan.context_tokens if budget == FULL_CACHE_BUDGET else budget,
                  context_tokens=plan.context_tokens, block_size=plan.block_size, seed=seed, examples=len(prompts))
        started = time.perf_counter()
        if task == RETRIEVAL:
            outcomes = [evaluate_retrieval(loaded.model, settings, example) for example in prompts]
            correct = np.array([c for o in outcomes for c in o.correct], dtype=bool)
            kept = np.array([k for o in outcomes for k in o.kept])
            lost = kept == 0.0
            row = replace(row, facts=int(np.mean([e.fact_positions.size for e in prompts])),
                          accuracy=float(correct.mean()), needle_kept=float(kept.mean()),
                          answered_without_needle=float(correct[lost].mean()) if lost.any() else float("nan"))
        else:
            outcomes = [evaluate_text(loaded.model, settings, window, loaded.tokenizer) for window in prompts]
            nats, total_bytes = sum(o.nats for o in outcomes), sum(o.bytes for o in outcomes)
            row = replace(row, bits_per_byte=nats / np.log(2) / total_bytes)  # run_plan adds the gap
        return replace(row, seconds=time.perf_counter() - started)


_PROCESS_MEASURER: Measurer | None = None


def _init_process(plan: Plan, threads: int) -> None:
    global _PROCESS_MEASURER
    torch.set_num_threads(threads)
    _PROCESS_MEASURER = Measurer(plan)


def _measure_in_process(run: tuple[str, EvictionConfig, float, int]) -> Row:
    assert _PROCESS_MEASURER is not None
    return _PROCESS_MEASURER.measure(*run)


def run_plan(plan: Plan, jobs: int = 1, threads: int = 1, on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Every run of the plan, the full-cache references first; text rows get their gap to the
    reference of the same seed (the same windows)."""
    runs = plan.runs()
    references = [r for r in runs if r[1] is FULL_CACHE]
    others = [r for r in runs if r[1] is not FULL_CACHE]
    rows: list[Row] = []
    full: dict[tuple[str, int], float] = {}

    def take(row: Row) -> None:
        if row.policy == FULL_CACHE.name:
            full[(row.task, row.seed)] = row.bits_per_byte
        if row.task == TEXT:
            row = replace(row, bpb_gap=row.bits_per_byte - full[(row.task, row.seed)])
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if jobs <= 1:
        torch.set_num_threads(threads)
        measurer = Measurer(plan)
        for run in references + others:
            take(measurer.measure(*run))
        return rows
    with ProcessPoolExecutor(jobs, initializer=_init_process, initargs=(plan, threads)) as pool:
        for row in pool.map(_measure_in_process, references):
            take(row)
        for row in pool.map(_measure_in_process, others, chunksize=1):
            take(row)
    return rows
