"""What `kvevict generate|score` (in process) and `kvevict client generate|score` (from a worker)
print: the finish reason and the eviction summary after a completion, the log-probabilities of a
scored text, or either as one JSON object (`--json`). No torch: clients use it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from kvevict.v1 import worker_pb2
from kvevict.worker.summary import EvictionSummary, format_summary


def finish_reason_name(reason: int) -> str:
    """FINISH_REASON_STOP -> `stop`."""
    return worker_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


def summary_text(summary: EvictionSummary, policy: str) -> str:
    """The summary table, plus a line when the worker failed open."""
    text = format_summary(summary, policy=policy)
    if summary.manager_fallback:
        text += "\nmanager: unreachable, decided in-process by the worker (fail-open)"
    return text


def generation_text(finish_reason: int, summary: EvictionSummary, policy: str) -> str:
    """What follows the completion's text (after a blank line)."""
    return f"finish reason: {finish_reason_name(finish_reason)}\n{summary_text(summary, policy)}"


def generation_json(completion: str, token_ids: Sequence[int], finish_reason: int, summary: EvictionSummary,
                    policy: str) -> str:
    return json.dumps({"policy": policy, "completion": completion, "token_ids": [int(t) for t in token_ids],
                       "finish_reason": finish_reason_name(finish_reason), "summary": dataclasses.asdict(summary)})


def score_text(token_logprobs: np.ndarray, total_logprob: float, perplexity: float, summary: EvictionSummary,
               policy: str) -> str:
    scored = token_logprobs.size
    lowest = float(np.min(token_logprobs)) if scored else float("nan")
    return "\n".join([
        f"tokens scored: {scored}",
        f"total log-prob: {total_logprob:.4f} nats (mean {total_logprob / max(1, scored):.4f}, min {lowest:.4f})",
        f"perplexity: {perplexity:.4f}",
        "",
        summary_text(summary, policy),
    ])


def score_json(token_logprobs: np.ndarray, total_logprob: float, perplexity: float, summary: EvictionSummary,
               policy: str) -> str:
    return json.dumps({"policy": policy, "scored_tokens": int(token_logprobs.size), "total_logprob": total_logprob,
                       "perplexity": perplexity, "token_logprobs": [float(x) for x in token_logprobs],
                       "summary": dataclasses.asdict(summary)})
