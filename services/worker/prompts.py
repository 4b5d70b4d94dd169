"""Requests of `WorkerService` turned into what the generator needs, validated.

Knows nothing of gRPC: every problem is a `RequestError` whose `kind` the servicer maps to a
status code and whose `field` names the offending request field (`token_ids.ids[3]`,
`sampling.top_p`, `eviction.policy.base`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import jinja2
import torch

from kvevict import defaults as shared_defaults
from kvevict.cache_manager.errors import InvalidArgument
from kvevict.cache_manager.settings import settings_from_request
from kvevict.policy_names import format_policy
from kvevict.v1 import cache_manager_pb2 as pb
from kvevict.v1 import worker_pb2
from kvevict.worker.cache_session import EvictionSettings
from kvevict.worker.sampling import SamplingConfig

# The manager's fields that come from the request's EvictionOptions; others (geometry,
# statistics_dtype) are the worker's own and a failure there is not the client's fault.
_EVICTION_FIELDS = ("policy", "budget", "block_size")


class ErrorKind(Enum):
    INVALID = "invalid"  # INVALID_ARGUMENT
    TOO_LARGE = "too_large"  # RESOURCE_EXHAUSTED
    PRECONDITION = "precondition"  # FAILED_PRECONDITION


class RequestError(ValueError):
    """A request the worker cannot serve as sent; `field` names the request field."""

    def __init__(self, field: str, message: str, kind: ErrorKind = ErrorKind.INVALID) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this worker."""

    default_max_new_tokens: int = 128  # when a request says 0
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int = 32768  # prompt or scored text, in tokens


@dataclass(frozen=True)
class EvictionDefaults:
    """The worker's eviction settings for what a request's `eviction` leaves unset."""

    policy: pb.PolicySpec = field(default_factory=shared_defaults.policy_spec)
    budget: pb.BudgetSpec = field(default_factory=shared_defaults.budget_spec)
    block_size: int = shared_defaults.BLOCK_SIZE
    statistics_dtype: int = 0  # 0 = the manager's choice per statistic (bfloat16 / float16)
    fail_open: bool = True
    pipelined: bool = False  # EvictionSettings.pipelined
    lookahead: int = 0  # EvictionSettings.lookahead


def eos_token_ids(tokenizer, model) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    ids = set()
    for candidate in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(candidate)
    return ids


def vocabulary_size(model) -> int:
    """Ids the model can embed (the embedding may be larger than the tokenizer's vocabulary)."""
    return model.get_input_embeddings().num_embeddings


def prompt_ids(request: worker_pb2.GenerateRequest, tokenizer, vocab_size: int, limits: Limits) -> torch.Tensor:
    """The prompt's token ids (n,) from text, token ids or chat messages. The next turn of a
    conversation (`conversation_id`) is text or token ids, its text tokenized without the
    tokenizer's special tokens (no BOS in the middle of a sequence)."""
    which = request.WhichOneof("prompt")
    if which is None:
        raise RequestError("prompt", "no prompt: set text, token_ids or chat")
    continuing = bool(request.conversation_id)
    if continuing and which == "chat":
        raise RequestError("chat", "a conversation continues with text or token_ids (the next turn as the model "
                           "should read it, rendered by the client)")
    if which == "text":
        ids = _text_ids(request.text, "text", tokenizer, special_tokens=not continuing)
    elif which == "token_ids":
        ids = _given_ids(request.token_ids, "token_ids.ids", vocab_size)
    else:
        ids = _chat_ids(request.chat, tokenizer)
    _check_length(ids, which, limits, minimum=1)
    return ids


def score_ids(request: worker_pb2.ScoreRequest, tokenizer, vocab_size: int, limits: Limits) -> torch.Tensor:
    """The ids of the text to score (n >= 2: the first token has nothing to be predicted from)."""
    which = request.WhichOneof("input")
    if which is None:
        raise RequestError("input", "nothing to score: set text or token_ids")
    if which == "text":
        ids = _text_ids(request.text, "text", tokenizer)
    else:
        ids = _given_ids(request.token_ids, "token_ids.ids", vocab_size)
    _check_length(ids, which, limits, minimum=2)
    return ids


def max_new_tokens(requested: int, limits: Limits) -> int:
    if requested == 0:
        return limits.default_max_new_tokens
    if requested > limits.max_new_tokens_limit:
        raise RequestError("max_new_tokens", f"{requested} is above this worker's limit of "
                           f"{limits.max_new_tokens_limit}", ErrorKind.TOO_LARGE)
    return requested


def stop_strings(stop) -> list[str]:
    for i, text in enumerate(stop):
        if not text:
            raise RequestError(f"stop[{i}]", "empty stop string")
    return list(stop)


def sampling_config(options: worker_pb2.SamplingOptions) -> SamplingConfig:
    """temperature >= 0 (0 = greedy), top_p in [0, 1] (0 = 1)."""
    if not (math.isfinite(options.temperature) and options.temperature >= 0):
        raise RequestError("sampling.temperature", f"must be a finite number >= 0, got {options.temperature}")
    if not 0.0 <= options.top_p <= 1.0:
        raise RequestError("sampling.top_p", f"must be in [0, 1] (0 means 1), got {options.top_p}")
    return SamplingConfig(temperature=options.temperature, top_p=options.top_p or 1.0, seed=options.seed)


def eviction_settings(request_message, defaults: EvictionDefaults, geometry: pb.ModelGeometry,
                      sampling_seed: int = 0) -> EvictionSettings:
    """The request's `eviction` with what it leaves unset taken from the worker's defaults
    (`eviction_fields`), validated by the manager's own validation before the request waits for
    the model (the manager validates again). The random policy's seed, when unset, is the
    sampling seed."""
    policy, budget, block_size = eviction_fields(request_message.eviction, defaults)
    if not policy.seed and sampling_seed:
        policy = pb.PolicySpec.FromString(policy.SerializeToString())
        policy.seed = sampling_seed
    settings = EvictionSettings(policy=policy, budget=budget, block_size=block_size,
                                statistics_dtype=defaults.statistics_dtype, fail_open=defaults.fail_open,
                                pipelined=defaults.pipelined, lookahead=defaults.lookahead)
    try:
        settings_from_request(pb.OpenSessionRequest(geometry=geometry, policy=policy, budget=budget,
                                                    block_size=block_size,
                                                    statistics_dtype=defaults.statistics_dtype))
    except InvalidArgument as error:
        raise eviction_error(error) from error
    return settings


def eviction_fields(options: worker_pb2.EvictionOptions,
                    defaults: EvictionDefaults) -> tuple[pb.PolicySpec, pb.BudgetSpec, int]:
    """(policy, budget, block size): each of `policy` and `budget` as the request sets it, or the
    worker's default when unset (the message, whole); `block_size` 0 is the worker's. A policy
    that is set must name its base (its other fields default as PolicySpec says)."""
    if options.HasField("policy"):
        policy = options.policy
        if not policy.base:
            raise RequestError("eviction.policy.base", "empty: name a base policy (see ListPolicies), or leave "
                               "eviction.policy unset for this worker's default "
                               f"({format_policy(defaults.policy.base, defaults.policy.wrapper)})")
    else:
        policy = defaults.policy
    budget = options.budget if options.HasField("budget") else defaults.budget
    return policy, budget, options.block_size or defaults.block_size


def eviction_error(error: InvalidArgument) -> RequestError | None:
    """The manager's InvalidArgument as the request's field (`eviction.policy.base`); None when
    the field is not one the request sets."""
    if error.field.split(".")[0].split("[")[0] not in _EVICTION_FIELDS:
        return None
    return RequestError(f"eviction.{error.field}", error.message)


def _text_ids(text: str, field: str, tokenizer, special_tokens: bool = True) -> torch.Tensor:
    if not text:
        raise RequestError(field, "empty text")
    return torch.tensor(tokenizer(text, add_special_tokens=special_tokens).input_ids, dtype=torch.long)


def _given_ids(token_ids: worker_pb2.TokenIds, field: str, vocab_size: int) -> torch.Tensor:
    ids = torch.tensor(list(token_ids.ids), dtype=torch.long)
    outside = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if outside.numel():
        i = int(outside[0, 0])
        raise RequestError(f"{field}[{i}]", f"token id {int(ids[i])} is outside the vocabulary [0, {vocab_size})")
    return ids


def _chat_ids(chat: worker_pb2.ChatPrompt, tokenizer) -> torch.Tensor:
    if tokenizer.chat_template is None:
        raise RequestError("chat", "this model's tokenizer has no chat template; send text or token_ids",
                           ErrorKind.PRECONDITION)
    if not chat.messages:
        raise RequestError("chat.messages", "no messages")
    for i, message in enumerate(chat.messages):
        if not message.role:
            raise RequestError(f"chat.messages[{i}].role", "empty role")
    messages = [{"role": m.role, "content": m.content} for m in chat.messages]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as error:  # templates reject e.g. unknown roles or their order
        raise RequestError("chat.messages", f"the chat template rejected the messages: {error}") from error
    # The template writes the special tokens (BOS) itself.
    return torch.tensor(tokenizer(rendered, add_special_tokens=False).input_ids, dtype=torch.long)


def _check_length(ids: torch.Tensor, field: str, limits: Limits, minimum: int) -> None:
    if ids.numel() < minimum:
        what = "no tokens" if ids.numel() == 0 else f"{ids.numel()} token (at least {minimum} needed)"
        raise RequestError(field if field != "token_ids" else "token_ids.ids", what)
    if ids.numel() > limits.max_prompt_tokens:
        raise RequestError(field, f"{ids.numel()} tokens, above this worker's limit of "
                           f"{limits.max_prompt_tokens}", ErrorKind.TOO_LARGE)
