"""Teacher-forced scoring under eviction: log p(token_i | tokens_<i) with the cache the model
would have had, block by block (perplexity and bits-per-byte measurements)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvevict.worker.cache_session import CacheSession, EvictionSettings, ForwardObserver
from kvevict.worker.generator import summarize
from kvevict.worker.summary import EvictionSummary
from kvevict.worker.manager_client import ManagerClient

if TYPE_CHECKING:
    from kvevict.worker.metrics import WorkerMetrics


@dataclass
class ScoreResult:
    token_logprobs: torch.Tensor  # (n - 1,) float32, nats: log p(token_i | tokens_<i), i = 1..n-1
    summary: EvictionSummary

    @property
    def total_logprob(self) -> float:
        """Sum of the log-probabilities, nats (summed in float64)."""
        return float(self.token_logprobs.double().sum())

    @property
    def perplexity(self) -> float:
        return float(torch.exp(-self.token_logprobs.double().mean())) if self.token_logprobs.numel() else float("nan")


def score_tokens(model: torch.nn.Module, manager: ManagerClient, settings: EvictionSettings,
                 token_ids: torch.Tensor, observer: ForwardObserver | None = None,
                 metrics: WorkerMetrics | None = None) -> ScoreResult:
    """Feeds `token_ids` (n >= 2) block by block with eviction; returns each next token's log-prob."""
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    if token_ids.numel() < 2:
        raise ValueError(f"scoring needs at least 2 tokens, got {token_ids.numel()}")
    targets = token_ids[1:]
    pieces: list[torch.Tensor] = []
    scored = 0

    def take(block_logits: torch.Tensor) -> None:
        nonlocal scored
        # Position i's logits predict token i + 1; the text's last position predicts nothing.
        count = min(block_logits.shape[0], targets.numel() - scored)
        logprobs = torch.log_softmax(block_logits[:count].float(), dim=-1)
        wanted = targets[scored: scored + count].to(logprobs.device)
        pieces.append(logprobs.gather(1, wanted[:, None])[:, 0].cpu())
        scored += count

    session = CacheSession(model, manager, settings, observer=observer, metrics=metrics)
    try:
        started = time.perf_counter()
        session.prefill(token_ids, on_block_logits=take)
        session.flush()  # a pipelined decision still in flight
        summary = summarize(session, token_ids.numel(), 0, time.perf_counter() - started, 0.0)
    finally:
        session.close()
    return ScoreResult(token_logprobs=torch.cat(pieces), summary=summary)
