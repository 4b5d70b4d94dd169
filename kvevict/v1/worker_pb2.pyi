from kvevict.v1 import cache_manager_pb2 as _cache_manager_pb2
from kvevict.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason

class EvictionOptions(_message.Message):
    __slots__ = ("policy", "budget", "block_size")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    policy: _cache_manager_pb2.PolicySpec
    budget: _cache_manager_pb2.BudgetSpec
    block_size: int
    def __init__(self, policy: _Optional[_Union[_cache_manager_pb2.PolicySpec, _Mapping]] = ..., budget: _Optional[_Union[_cache_manager_pb2.BudgetSpec, _Mapping]] = ..., block_size: _Optional[int] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatPrompt(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "chat", "eviction", "sampling", "max_new_tokens", "stop", "keep_conversation", "conversation_id", "end_conversation")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    KEEP_CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    END_CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    chat: ChatPrompt
    eviction: EvictionOptions
    sampling: SamplingOptions
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    keep_conversation: bool
    conversation_id: str
    end_conversation: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., chat: _Optional[_Union[ChatPrompt, _Mapping]] = ..., eviction: _Optional[_Union[EvictionOptions, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., keep_conversation: _Optional[bool] = ..., conversation_id: _Optional[str] = ..., end_conversation: _Optional[bool] = ...) -> None: ...

class EvictionSummary(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "evicted_per_layer", "final_lengths", "layer_budgets", "kv_bytes", "full_cache_bytes", "peak_kv_bytes", "reports", "prefill_seconds", "decode_seconds", "manager_seconds", "manager_fallback", "peak_lengths", "report_bytes", "final_head_lengths", "kept_kv_bytes")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    FINAL_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    FULL_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MANAGER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MANAGER_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PEAK_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    REPORT_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINAL_HEAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    KEPT_KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    evicted_per_layer: _containers.RepeatedScalarFieldContainer[int]
    final_lengths: _containers.RepeatedScalarFieldContainer[int]
    layer_budgets: _containers.RepeatedScalarFieldContainer[int]
    kv_bytes: int
    full_cache_bytes: int
    peak_kv_bytes: int
    reports: int
    prefill_seconds: float
    decode_seconds: float
    manager_seconds: float
    manager_fallback: bool
    peak_lengths: _containers.RepeatedScalarFieldContainer[int]
    report_bytes: int
    final_head_lengths: _containers.RepeatedScalarFieldContainer[int]
    kept_kv_bytes: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., evicted_per_layer: _Optional[_Iterable[int]] = ..., final_lengths: _Optional[_Iterable[int]] = ..., layer_budgets: _Optional[_Iterable[int]] = ..., kv_bytes: _Optional[int] = ..., full_cache_bytes: _Optional[int] = ..., peak_kv_bytes: _Optional[int] = ..., reports: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., manager_seconds: _Optional[float] = ..., manager_fallback: _Optional[bool] = ..., peak_lengths: _Optional[_Iterable[int]] = ..., report_bytes: _Optional[int] = ..., final_head_lengths: _Optional[_Iterable[int]] = ..., kept_kv_bytes: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "summary", "conversation_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    summary: EvictionSummary
    conversation_id: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., summary: _Optional[_Union[EvictionSummary, _Mapping]] = ..., conversation_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "token_ids", "eviction")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EVICTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    eviction: EvictionOptions
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., eviction: _Optional[_Union[EvictionOptions, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("token_logprobs", "total_logprob", "perplexity", "scored_tokens", "summary")
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token_logprobs: _tensor_pb2.Tensor
    total_logprob: float
    perplexity: float
    scored_tokens: int
    summary: EvictionSummary
    def __init__(self, token_logprobs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., total_logprob: _Optional[float] = ..., perplexity: _Optional[float] = ..., scored_tokens: _Optional[int] = ..., summary: _Optional[_Union[EvictionSummary, _Mapping]] = ...) -> None: ...
