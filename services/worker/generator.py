"""Generation with an evicting KV cache: block-wise prefill, then a decode loop we own.

transformers' `generate()` re-feeds tokens when the cache is shorter than the sequence, so it
cannot drive a pruned cache; this loop feeds exactly one new token per step at its true position.
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch

from kvevict.worker.cache_session import CacheSession, EvictionSettings, ForwardObserver
from kvevict.worker.manager_client import ManagerClient
from kvevict.worker.sampling import Sampler, SamplingConfig
from kvevict.worker.summary import EvictionSummary

if TYPE_CHECKING:
    from kvevict.worker.metrics import WorkerMetrics


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    summary: EvictionSummary
    step_logits: list[torch.Tensor] = field(default_factory=list)  # when asked: logits that chose each token
    session: CacheSession | None = None  # still open, when asked to keep it (a conversation's next turn)


class EvictingGenerator:
    """Generates from one model through a manager session per request."""

    def __init__(self, model: torch.nn.Module, manager: ManagerClient, settings: EvictionSettings,
                 metrics: WorkerMetrics | None = None, decisions: Executor | None = None) -> None:
        """`decisions`: where a pipelined session decides its reports (CacheSession)."""
        self.model = model
        self.manager = manager
        self.settings = settings
        self.metrics = metrics
        self.decisions = decisions

    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        eos_token_ids: set[int] | None = None,
        on_prefill_block: Callable[[int], None] | None = None,
        on_token: Callable[[int], bool | None] | None = None,
        observer: ForwardObserver | None = None,
        keep_logits: bool = False,
        session: CacheSession | None = None,
        keep_session: bool = False,
    ) -> GenerationResult:
        """Prefills the prompt, then samples up to `max_new_tokens`, stopping at an EOS token or
        after a token for which `on_token` returns True (e.g. a stop string completed).

        `session`: an open session to go on with (a conversation's next turn: the prompt follows
        what it holds), instead of a new one. `keep_session`: leave it open in the result (the
        last generated token is not fed: the next turn's prompt starts with it); a generation
        that fails closes it all the same."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
        metrics = self.metrics
        if session is None:
            session = CacheSession(self.model, self.manager, self.settings, observer=observer, metrics=metrics,
                                   decisions=self.decisions)
        sampler = Sampler(sampling)
        generated: list[int] = []
        kept_logits: list[torch.Tensor] = []
        try:
            started = time.perf_counter()
            logits = session.prefill(prompt, on_block=on_prefill_block)
            prefill_seconds = time.perf_counter() - started
            started = last_token = time.perf_counter()
            while len(generated) < max_new_tokens:
                if keep_logits:
                    kept_logits.append(logits.float().cpu())
                token = sampler(logits)
                generated.append(token)
                if metrics is not None:  # the token's decode time: since the previous token (or the prefill)
                    now = time.perf_counter()
                    metrics.token_generated(now - last_token)
                    last_token = now
                if on_token is not None and on_token(token):
                    break
                if eos_token_ids and token in eos_token_ids:
                    break
                if len(generated) == max_new_tokens:
                    break  # the last token needs no forward: nothing will read its logits
                logits = session.decode(token)
            decode_seconds = time.perf_counter() - started
            session.flush()  # a pipelined decision still in flight
            summary = summarize(session, len(prompt), len(generated), prefill_seconds, decode_seconds)
            if metrics is not None:
                metrics.generation_done(len(generated), decode_seconds)
        except BaseException:
            session.close()
            raise
        if not keep_session:
            session.close()
            # CloseSession is a manager call too: the summary's manager time includes it.
            summary = replace(summary, manager_seconds=session.stats.manager_seconds)
        return GenerationResult(token_ids=generated, summary=summary, step_logits=kept_logits,
                                session=session if keep_session else None)


def summarize(session: CacheSession, prompt_tokens: int, generated: int, prefill_s: float,
               decode_s: float) -> EvictionSummary:
    return EvictionSummary(
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        peak_lengths=list(session.stats.peak_lengths),
        **session.cache_counts(),
        peak_kv_bytes=session.stats.peak_kv_bytes,
        reports=session.stats.reports,
        report_bytes=session.stats.report_bytes,
        manager_seconds=session.stats.manager_seconds,
        prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        manager_fallback=session.stats.manager_fallback,
    )
