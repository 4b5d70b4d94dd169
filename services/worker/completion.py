"""A generation as text: the generator's tokens detokenized as they come, ended by EOS, a stop
string or the token limit, with the finish reason. WorkerService.Generate and `kvevict generate`
both run this one function."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from kvevict.v1 import worker_pb2
from kvevict.worker.cache_session import CacheSession
from kvevict.worker.generator import EvictingGenerator
from kvevict.worker.sampling import SamplingConfig
from kvevict.worker.summary import EvictionSummary
from kvevict.worker.text_stream import TextStream

# Called with each generated token and the text it releases (often empty: an incomplete
# character, or a possible start of a stop string); raising stops the generation.
OnDelta = Callable[[int, str], None]


@dataclass
class Completion:
    token_ids: list[int]  # every generated token, those of a stop string included
    text: str  # everything released: the stop string and what follows it excluded
    tail: str  # the part of `text` released after the last token (what the deltas did not carry)
    finish_reason: int  # worker_pb2.FinishReason
    summary: EvictionSummary
    session: CacheSession | None = None  # kept open when asked (keep_session)


def complete(generator: EvictingGenerator, tokenizer, prompt_ids: torch.Tensor, max_new_tokens: int,
             sampling: SamplingConfig, eos_token_ids: Collection[int], stop: Collection[str] = (),
             on_delta: OnDelta | None = None, on_prefill_block: Callable[[int], None] | None = None,
             session: CacheSession | None = None, keep_session: bool = False) -> Completion:
    """Generates up to `max_new_tokens` after `prompt_ids`, stopping at an EOS token or once the
    text holds one of `stop` (`session`, `keep_session`: as EvictingGenerator.generate)."""
    stream = TextStream(tokenizer, list(stop))
    released: list[str] = []

    def on_token(token_id: int) -> bool:
        delta = stream.push(token_id)
        released.append(delta)
        if on_delta is not None:
            on_delta(token_id, delta)
        return stream.stopped  # a stop string completed: end after this token

    result = generator.generate(prompt_ids, max_new_tokens, sampling, eos_token_ids=set(eos_token_ids),
                                on_prefill_block=on_prefill_block, on_token=on_token, session=session,
                                keep_session=keep_session)
    if stream.stopped:
        reason = worker_pb2.FINISH_REASON_STOP
    elif result.token_ids and result.token_ids[-1] in eos_token_ids:
        reason = worker_pb2.FINISH_REASON_EOS
    else:
        reason = worker_pb2.FINISH_REASON_LENGTH
    tail = stream.finish()
    return Completion(result.token_ids, "".join(released) + tail, tail, reason, result.summary, result.session)
