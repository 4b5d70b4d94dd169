"""Quality of one eviction configuration, measured through the worker's own code path.

Every prompt runs through `CacheSession` (block-wise prefill, statistics inside attention, one
ReportBlock per block) against a manager (`EmbeddedManagerClient` unless told otherwise), exactly
as `kvevict generate` and the worker service run it. Two measurements:

* retrieval: the questions of a `RetrievalExample` are teacher-forced in the prompt's last block,
  after the context was evicted down to the budget; a question is answered when every answer
  token is the argmax of the logits before it (what greedy decoding would produce), and its
  needle was kept when the answer's tokens were still cached when the question was read;
* text: bits per byte of a token window under eviction (teacher-forced log-probabilities).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kvevict import defaults
from kvevict.evaluation.retrieval_task import RetrievalExample
from kvevict.policy_names import format_policy
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import tensor_pb2
from kvevict.worker.cache_session import CacheSession, EvictionSettings
from kvevict.worker.manager_client import EmbeddedManagerClient, ManagerClient
from kvevict.worker.observers import RepeatPrompt
from kvevict.worker.scoring import score_tokens

# A budget no prompt reaches: the cache is never evicted (the full-cache reference).
FULL_CACHE_BUDGET = defaults.FULL_CACHE_BUDGET


@dataclass(frozen=True)
class EvictionConfig:
    """What the manager is asked to do, budget aside. `label` names it in tables and plots."""

    base: str
    wrapper: str = "none"
    allocator: str = "uniform"
    sink: int | None = None  # None: the policy's default
    recent: int | None = None
    label: str = ""
    lookahead: int = 0  # pseudo tokens whose queries observe each prefill decision (0: none)
    # Context reconstruction (EvictionSettings.reconstruct): the chunk of context tokens repeated
    # before each prefill decision (0: none), how its queries pool, and the repeat prompt's ids
    # (the tokenizer's: kvevict.evaluation.suite_jobs.measure fills it in when None).
    reconstruct: int = 0
    reconstruct_pool: str = "max"
    repeat_prompt: RepeatPrompt | None = None
    # lukv / epicache: the head profile's bytes (`kvevict profile`), sent with the budget.
    profile: bytes = field(default=b"", repr=False)
    # BudgetSpec.floor: the per-head allocators' floor fraction (None: the allocator's default).
    floor: float | None = None
    # The statistics' wire dtype (a tensor_pb2 DType; unspecified: the manager's choice per statistic).
    statistics_dtype: int = tensor_pb2.DTYPE_UNSPECIFIED

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return format_policy(self.base, self.wrapper)

    def settings(self, budget: int, block_size: int, seed: int = 0) -> EvictionSettings:
        policy = pb.PolicySpec(base=self.base, wrapper=self.wrapper, seed=seed)
        if self.sink is not None:
            policy.sink_tokens = self.sink
        if self.recent is not None:
            policy.recent_tokens = self.recent
        spec = pb.BudgetSpec(tokens=budget, allocator=self.allocator, profile=self.profile)
        if self.floor is not None:
            spec.floor = self.floor
        return EvictionSettings(policy=policy, budget=spec,
                                block_size=block_size, lookahead=self.lookahead, reconstruct=self.reconstruct,
                                reconstruct_pool=self.reconstruct_pool, repeat_prompt=self.repeat_prompt,
                                statistics_dtype=self.statistics_dtype)


FULL_CACHE = EvictionConfig(base=defaults.FULL_CACHE_BASE, label="full cache")


@dataclass(frozen=True)
class RetrievalOutcome:
    correct: tuple[bool, ...]  # per question: every answer token was the argmax
    kept: tuple[float, ...]  # per question: fraction of (layer, KV head) caches holding its answer

    @property
    def answered(self) -> int:
        return sum(self.correct)

    @property
    def asked(self) -> int:
        return len(self.correct)


@dataclass(frozen=True)
class TextOutcome:
    nats: float  # summed negative log-likelihood of the predicted tokens
    tokens: int  # tokens predicted (window length - 1)
    bytes: int  # UTF-8 bytes those tokens decode to


class NeedleWatch:
    """Observer of every forward: for each question, which caches held its needle when the
    position predicting the answer's first token was read."""

    def __init__(self, example: RetrievalExample) -> None:
        self.questions = example.questions
        self.kept = [math.nan] * len(self.questions)

    def __call__(self, positions: torch.Tensor, cached: list[torch.Tensor]) -> None:
        first, last = int(positions[0]), int(positions[-1])
        for index, question in enumerate(self.questions):
            if first <= question.answer_start - 1 <= last:
                needles = torch.tensor(question.needle_positions, device=cached[0].device)
                # Per layer (Hkv, L) -> per KV head: does it hold every token of the answer?
                held = torch.cat([(layer[None] == needles[:, None, None]).any(-1).all(0) for layer in cached])
                self.kept[index] = float(held.float().mean())


def evaluate_retrieval(model: torch.nn.Module, settings: EvictionSettings, example: RetrievalExample,
                       manager: ManagerClient | None = None) -> RetrievalOutcome:
    """Prefills the example block by block under `settings` and scores its questions."""
    blocks: list[torch.Tensor] = []
    watch = NeedleWatch(example)
    session = CacheSession(model, manager or EmbeddedManagerClient(), settings, observer=watch)
    try:
        session.prefill(torch.from_numpy(example.token_ids), on_block_logits=lambda logits: blocks.append(logits))
    finally:
        session.close()
    predicted = torch.cat(blocks).argmax(dim=-1).cpu().numpy()
    correct = []
    for question in example.questions:
        start, answer = question.answer_start, np.asarray(question.answer_ids)
        correct.append(bool((predicted[start - 1: start - 1 + answer.size] == answer).all()))
    return RetrievalOutcome(correct=tuple(correct), kept=tuple(watch.kept))


def evaluate_text(model: torch.nn.Module, settings: EvictionSettings, token_ids: torch.Tensor, tokenizer,
                  manager: ManagerClient | None = None) -> TextOutcome:
    """Teacher-forced negative log-likelihood of a token window under `settings`."""
    result = score_tokens(model, manager or EmbeddedManagerClient(), settings, token_ids)
    predicted = token_ids[1:].tolist()
    return TextOutcome(nats=float(-result.token_logprobs.double().sum()), tokens=len(predicted),
                       bytes=len(tokenizer.decode(predicted).encode("utf-8")))
