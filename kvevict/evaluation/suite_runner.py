"""One prompt of the real-model suite under one eviction configuration, through the worker's
code path (`CacheSession`: block-wise prefill, statistics inside attention, ReportBlock).

The prompt is `context + question` as raw text (completion style). The context is evicted to
`round(kept_fraction * context_tokens)` tokens per KV head per layer; the question's tokens are
not counted and never evicted; the answer is decoded greedily. Protocols:

* `question_agnostic`: the context is prefilled block by block and evicted without seeing the
  question (kvpress's leaderboard protocol); eviction stops when the question arrives;
* `one_shot`: the whole context is one block, evicted once after it (kvpress's way: the peak
  memory is the full context), then the question as above: what separates the cost of bounded
  peak memory from the cost of the scores;
* `question_aware`: as `question_agnostic`, but the question's own queries, computed by a forward
  of the question alone at its true positions, act as every block's observation window (window
  statistics: TOVA, SnapKV and the CAOTE reference over them) at no extra peak memory;
* `question_in_context`: as `question_aware`, but before every block's decision the question is
  forwarded on the cache as it is then and discarded (Lookahead Q-Cache's mechanism with the
  question's tokens): its queries have read the context, as kvpress's question-aware presses'
  do, for one question-sized forward per decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvevict.evaluation.runner import FULL_CACHE_BUDGET, EvictionConfig
from kvevict.evaluation.suite_metric import cut_prediction
from kvevict.worker.cache_session import CacheSession
from kvevict.worker.manager_client import EmbeddedManagerClient, ManagerClient
from kvevict.worker.prompts import eos_token_ids

PROTOCOLS = ("question_agnostic", "question_aware", "one_shot", "question_in_context")


@dataclass(frozen=True)
class Answer:
    prediction: str
    seconds: float  # prefill + decode, wall
    context_tokens: int
    kept_tokens: int  # the context budget per KV head per layer (context_tokens for the full cache)


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Context ids (with the tokenizer's BOS if it adds one) and question ids of a prompt-file
    record (kvevict.evaluation.ruler_records), tokenized apart as kvpress does, so both systems
    see the same tokens."""
    context = tokenizer(record["context"]).input_ids
    question = tokenizer(record["question"], add_special_tokens=False).input_ids
    return context, question


def answer_prompt(model: torch.nn.Module, tokenizer, record: dict, config: EvictionConfig | None,
                  kept_fraction: float = 1.0, protocol: str = "question_agnostic", block_size: int = 128,
                  manager: ManagerClient | None = None) -> Answer:
    """Greedy answer of a prompt-file record with its context evicted under `config` (None: the
    full cache)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    context, question = encode(tokenizer, record)
    kept = len(context) if config is None else max(1, round(kept_fraction * len(context)))
    budget = FULL_CACHE_BUDGET if config is None else kept
    # The full cache evicts nothing, so blocks would bound nothing: one forward of the whole
    # prompt, as transformers runs it (bit-identical logits; 128-token blocks differ in bfloat16).
    block = len(context) + len(question) if config is None else len(context) if protocol == "one_shot" else block_size
    settings = (config or EvictionConfig(base="streaming")).settings(budget, block)
    started = time.perf_counter()
    session = CacheSession(model, manager or EmbeddedManagerClient(), settings)
    try:
        if config is None:
            logits = session.prefill(torch.tensor(context + question, dtype=torch.long))
        else:
            if protocol == "question_aware":
                session.observe_queries_of(torch.tensor(question, dtype=torch.long), first_position=len(context))
            elif protocol == "question_in_context":
                session.observe_question_in_context(torch.tensor(question, dtype=torch.long), len(context))
            session.prefill(torch.tensor(context, dtype=torch.long))
            session.stop_evicting()
            logits = session.prefill(torch.tensor(question, dtype=torch.long)) if question else None
        text = _greedy(session, logits, record["max_new_tokens"], eos_token_ids(tokenizer, model), tokenizer)
    finally:
        session.close()
    return Answer(prediction=text, seconds=time.perf_counter() - started, context_tokens=len(context),
                  kept_tokens=kept)


def _greedy(session: CacheSession, logits: torch.Tensor | None, max_new_tokens: int, eos: set[int],
            tokenizer) -> str:
    """Greedy text until EOS, max_new_tokens, or a newline once some text was produced (cut there)."""
    generated: list[int] = []
    text = ""
    while logits is not None and len(generated) < max_new_tokens:
        token = int(torch.argmax(logits))
        if token in eos:
            break
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if cut_prediction(text) != text:
            break
        if len(generated) < max_new_tokens:
            logits = session.decode(token)
    return cut_prediction(text)
