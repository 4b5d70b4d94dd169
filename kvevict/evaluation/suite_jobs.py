"""Running the real-model suite's jobs: which (job, record) pairs a run measures, and measuring
each through `answer_prompt` into one results-CSV row (`benchmarks/suite.py run` and
`kvevict eval` share it).

A record is a prompt-file record (kvevict.evaluation.ruler_records) or any dict with its `id`,
`task`, `length`, `context`, `question`, `answers`, `metric` and `max_new_tokens`. Rows are
appended one by one, so a run cut short keeps what it measured and a rerun skips it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from kvevict.cache_manager.errors import InvalidArgument
from kvevict.evaluation.suite_grid import Job, method_config, method_name
from kvevict.evaluation.suite_metric import score
from kvevict.evaluation.suite_report import FULL_CACHE, SuiteRow, append_rows
from kvevict.evaluation.suite_runner import answer_prompt
from kvevict.worker.observers import RepeatPrompt

SYSTEM = "kvevict"

DoneKey = tuple[str, str, str, float, str]  # (system, method, protocol, kept fraction, id), as done_keys gives


def configured_jobs(methods: Sequence[str], allocators: Sequence[str], protocols: Sequence[str],
                    kept: Sequence[float], sink: int | None = None, full_cache: bool = True,
                    lookahead: int = 0, reconstruct: int = 0, reconstruct_pool: str = "max",
                    profile: bytes = b"", floor: float | None = None, recent: int | None = None,
                    statistics_dtype: str = "auto") -> list[Job]:
    """One record's jobs: the full cache first (unless `full_cache` is False), then every method
    (policy spelling) under every allocator, protocol and kept fraction (`profile`: the head
    profile the lukv and epicache allocators read; `floor`: the per-head allocators' floor
    fraction, None for their default; `sink` / `recent`: protected first / last tokens, None for
    each policy's default; `statistics_dtype`: the statistics' wire dtype, a
    `kvevict.cli_options.STATISTICS_DTYPES` name)."""
    jobs = [Job(FULL_CACHE, None, "question_agnostic", 1.0)] if full_cache else []
    jobs += [Job(method_name(m, a, sink, lookahead, reconstruct, reconstruct_pool, floor, recent, statistics_dtype),
                 method_config(m, a, sink, lookahead, reconstruct, reconstruct_pool, profile, floor, recent,
                               statistics_dtype),
                 protocol, fraction)
             for m in methods for a in allocators for protocol in protocols for fraction in kept]
    return jobs


def per_record(jobs: Sequence[Job], records: Sequence[dict]) -> list[tuple[Job, dict]]:
    """(job, record) pairs, record by record (a run cut short holds every job of its records)."""
    return [(job, record) for record in records for job in jobs]


def pending(pairs: Sequence[tuple[Job, dict]], done: set[DoneKey]) -> list[tuple[Job, dict]]:
    """The pairs whose row is not in `done` yet."""
    return [(job, r) for job, r in pairs if (SYSTEM, job.method, job.protocol, job.kept, r["id"]) not in done]


def measure(model: torch.nn.Module, tokenizer, job: Job, record: dict, block_size: int = 128) -> SuiteRow:
    """The results row of one job on one record."""
    config = job.config
    if config is not None and config.reconstruct and config.repeat_prompt is None:
        # The raw-text prompt, as the suite's prompts are raw text (and as kvpress's KVzip ran on them).
        config = replace(config, repeat_prompt=RepeatPrompt.from_tokenizer(tokenizer))
    answer = answer_prompt(model, tokenizer, record, config, job.kept, job.protocol, block_size)
    return SuiteRow(SYSTEM, job.method, job.protocol, job.kept, record["id"], record["task"], record["length"],
                    score(answer.prediction, record["answers"], record["metric"]), answer.prediction, answer.seconds)


def run_jobs(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[Job, dict]], out: Path,
             block_size: int = 128, progress: bool = True, desc: str = "suite") -> int:
    """Measures every pair, appending each row to `out` as soon as it is measured; returns how many.
    ValueError names the job and record the manager refuses (the rows before it stay)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for job, record in tqdm(pairs, desc=desc, disable=not progress):
        try:
            row = measure(model, tokenizer, job, record, block_size)
        except InvalidArgument as error:  # e.g. a budget too small for the policy's protected tokens
            raise ValueError(f"{job.method} at {job.kept:.0%} kept ({job.protocol}) on record {record['id']!r}: "
                             f"{error}") from error
        append_rows([row], out)
    return len(pairs)
