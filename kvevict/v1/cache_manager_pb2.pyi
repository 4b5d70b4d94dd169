from kvevict.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Statistic(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATISTIC_UNSPECIFIED: _ClassVar[Statistic]
    STATISTIC_ATTN_SUM: _ClassVar[Statistic]
    STATISTIC_ATTN_WINDOW: _ClassVar[Statistic]
    STATISTIC_VALUE_DEV_MEAN: _ClassVar[Statistic]
    STATISTIC_KEY_COSINE: _ClassVar[Statistic]
    STATISTIC_VALUE_DEV_EXCLUDED: _ClassVar[Statistic]
    STATISTIC_QUERY_EVICT_ERROR: _ClassVar[Statistic]
    STATISTIC_QUERY_VALUE_ERROR: _ClassVar[Statistic]
    STATISTIC_QUERY_KEY_ERROR: _ClassVar[Statistic]
    STATISTIC_QUERY_KEY_VALUE_ERROR: _ClassVar[Statistic]
    STATISTIC_QUERY_PROJECTED_ERROR: _ClassVar[Statistic]

class Reference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFERENCE_UNSPECIFIED: _ClassVar[Reference]
    REFERENCE_WINDOW_ATTENTION: _ClassVar[Reference]
    REFERENCE_ACCUMULATED_ATTENTION: _ClassVar[Reference]
    REFERENCE_KEY_DISSIMILARITY: _ClassVar[Reference]
    REFERENCE_POSITION: _ClassVar[Reference]
    REFERENCE_VALUE_DEVIATION: _ClassVar[Reference]
    REFERENCE_UNIFORM: _ClassVar[Reference]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PREFILL: _ClassVar[Phase]
    PHASE_DECODE: _ClassVar[Phase]
STATISTIC_UNSPECIFIED: Statistic
STATISTIC_ATTN_SUM: Statistic
STATISTIC_ATTN_WINDOW: Statistic
STATISTIC_VALUE_DEV_MEAN: Statistic
STATISTIC_KEY_COSINE: Statistic
STATISTIC_VALUE_DEV_EXCLUDED: Statistic
STATISTIC_QUERY_EVICT_ERROR: Statistic
STATISTIC_QUERY_VALUE_ERROR: Statistic
STATISTIC_QUERY_KEY_ERROR: Statistic
STATISTIC_QUERY_KEY_VALUE_ERROR: Statistic
STATISTIC_QUERY_PROJECTED_ERROR: Statistic
REFERENCE_UNSPECIFIED: Reference
REFERENCE_WINDOW_ATTENTION: Reference
REFERENCE_ACCUMULATED_ATTENTION: Reference
REFERENCE_KEY_DISSIMILARITY: Reference
REFERENCE_POSITION: Reference
REFERENCE_VALUE_DEVIATION: Reference
REFERENCE_UNIFORM: Reference
PHASE_UNSPECIFIED: Phase
PHASE_PREFILL: Phase
PHASE_DECODE: Phase

class ModelGeometry(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "num_query_heads", "head_dim", "sliding_windows")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERY_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    num_query_heads: int
    head_dim: int
    sliding_windows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., num_query_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., sliding_windows: _Optional[_Iterable[int]] = ...) -> None: ...

class PolicySpec(_message.Message):
    __slots__ = ("base", "wrapper", "sink_tokens", "recent_tokens", "window", "pool_kernel", "seed")
    BASE_FIELD_NUMBER: _ClassVar[int]
    WRAPPER_FIELD_NUMBER: _ClassVar[int]
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    POOL_KERNEL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    base: str
    wrapper: str
    sink_tokens: int
    recent_tokens: int
    window: int
    pool_kernel: int
    seed: int
    def __init__(self, base: _Optional[str] = ..., wrapper: _Optional[str] = ..., sink_tokens: _Optional[int] = ..., recent_tokens: _Optional[int] = ..., window: _Optional[int] = ..., pool_kernel: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class BudgetSpec(_message.Message):
    __slots__ = ("tokens", "allocator", "floor", "profile")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATOR_FIELD_NUMBER: _ClassVar[int]
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    allocator: str
    floor: float
    profile: bytes
    def __init__(self, tokens: _Optional[int] = ..., allocator: _Optional[str] = ..., floor: _Optional[float] = ..., profile: _Optional[bytes] = ...) -> None: ...

class StatisticRequirement(_message.Message):
    __slots__ = ("statistic", "window", "reference", "pool_kernel", "dtype")
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    POOL_KERNEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    statistic: Statistic
    window: int
    reference: Reference
    pool_kernel: int
    dtype: _tensor_pb2.DType
    def __init__(self, statistic: _Optional[_Union[Statistic, str]] = ..., window: _Optional[int] = ..., reference: _Optional[_Union[Reference, str]] = ..., pool_kernel: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("geometry", "policy", "budget", "block_size", "statistics_dtype")
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    geometry: ModelGeometry
    policy: PolicySpec
    budget: BudgetSpec
    block_size: int
    statistics_dtype: _tensor_pb2.DType
    def __init__(self, geometry: _Optional[_Union[ModelGeometry, _Mapping]] = ..., policy: _Optional[_Union[PolicySpec, _Mapping]] = ..., budget: _Optional[_Union[BudgetSpec, _Mapping]] = ..., block_size: _Optional[int] = ..., statistics_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "statistics", "report_every_block", "layer_budgets", "statistics_dtype", "per_head_budgets", "head_budgets")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PER_HEAD_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    HEAD_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    statistics: _containers.RepeatedCompositeFieldContainer[StatisticRequirement]
    report_every_block: bool
    layer_budgets: _containers.RepeatedScalarFieldContainer[int]
    statistics_dtype: _tensor_pb2.DType
    per_head_budgets: bool
    head_budgets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., statistics: _Optional[_Iterable[_Union[StatisticRequirement, _Mapping]]] = ..., report_every_block: _Optional[bool] = ..., layer_budgets: _Optional[_Iterable[int]] = ..., statistics_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., per_head_budgets: _Optional[bool] = ..., head_budgets: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerStatistics(_message.Message):
    __slots__ = ("layer", "cache_length", "values", "head_lengths")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    HEAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    cache_length: int
    values: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    head_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., cache_length: _Optional[int] = ..., values: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., head_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportBlockRequest(_message.Message):
    __slots__ = ("session_id", "sequence", "phase", "positions", "layers")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sequence: int
    phase: Phase
    positions: _tensor_pb2.Tensor
    layers: _containers.RepeatedCompositeFieldContainer[LayerStatistics]
    def __init__(self, session_id: _Optional[str] = ..., sequence: _Optional[int] = ..., phase: _Optional[_Union[Phase, str]] = ..., positions: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerStatistics, _Mapping]]] = ...) -> None: ...

class LayerKeep(_message.Message):
    __slots__ = ("layer", "cache_length", "kept_tokens", "keep", "head_lengths", "head_kept")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    HEAD_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    HEAD_KEPT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    cache_length: int
    kept_tokens: int
    keep: _tensor_pb2.Tensor
    head_lengths: _containers.RepeatedScalarFieldContainer[int]
    head_kept: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., cache_length: _Optional[int] = ..., kept_tokens: _Optional[int] = ..., keep: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., head_lengths: _Optional[_Iterable[int]] = ..., head_kept: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportBlockResponse(_message.Message):
    __slots__ = ("sequence", "keeps", "layer_budgets", "evicted_tokens", "head_budgets")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KEEPS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEAD_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    keeps: _containers.RepeatedCompositeFieldContainer[LayerKeep]
    layer_budgets: _containers.RepeatedScalarFieldContainer[int]
    evicted_tokens: int
    head_budgets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, sequence: _Optional[int] = ..., keeps: _Optional[_Iterable[_Union[LayerKeep, _Mapping]]] = ..., layer_budgets: _Optional[_Iterable[int]] = ..., evicted_tokens: _Optional[int] = ..., head_budgets: _Optional[_Iterable[int]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("reports", "evicted_tokens")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    reports: int
    evicted_tokens: int
    def __init__(self, reports: _Optional[int] = ..., evicted_tokens: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session_id", "geometry", "policy", "budget", "block_size", "reports", "last_sequence", "evicted_tokens", "layer_budgets", "cache_lengths", "head_budgets", "head_cache_lengths")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    HEAD_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    HEAD_CACHE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    geometry: ModelGeometry
    policy: PolicySpec
    budget: BudgetSpec
    block_size: int
    reports: int
    last_sequence: int
    evicted_tokens: int
    layer_budgets: _containers.RepeatedScalarFieldContainer[int]
    cache_lengths: _containers.RepeatedScalarFieldContainer[int]
    head_budgets: _containers.RepeatedScalarFieldContainer[int]
    head_cache_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., geometry: _Optional[_Union[ModelGeometry, _Mapping]] = ..., policy: _Optional[_Union[PolicySpec, _Mapping]] = ..., budget: _Optional[_Union[BudgetSpec, _Mapping]] = ..., block_size: _Optional[int] = ..., reports: _Optional[int] = ..., last_sequence: _Optional[int] = ..., evicted_tokens: _Optional[int] = ..., layer_budgets: _Optional[_Iterable[int]] = ..., cache_lengths: _Optional[_Iterable[int]] = ..., head_budgets: _Optional[_Iterable[int]] = ..., head_cache_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyOption(_message.Message):
    __slots__ = ("name", "default_value", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_value: str
    description: str
    def __init__(self, name: _Optional[str] = ..., default_value: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class PolicyInfo(_message.Message):
    __slots__ = ("kind", "name", "description", "statistics", "accumulates", "options")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    description: str
    statistics: _containers.RepeatedScalarFieldContainer[str]
    accumulates: bool
    options: _containers.RepeatedCompositeFieldContainer[PolicyOption]
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., statistics: _Optional[_Iterable[str]] = ..., accumulates: _Optional[bool] = ..., options: _Optional[_Iterable[_Union[PolicyOption, _Mapping]]] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies",)
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicyInfo]
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicyInfo, _Mapping]]] = ...) -> None: ...
