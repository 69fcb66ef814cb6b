from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class Adapter(_message.Message):
    __slots__ = ("name", "path", "rank", "target_modules", "on_device", "requests", "running")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    ON_DEVICE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    on_device: bool
    requests: int
    running: int
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., on_device: _Optional[bool] = ..., requests: _Optional[int] = ..., running: _Optional[int] = ...) -> None: ...

class LoadAdapterRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "load_seconds")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    load_seconds: float
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("model", "device", "dtype", "uptime_seconds", "requests_in_flight", "requests_waiting", "version", "engine", "model_path", "breaker", "limits", "degraded", "draining", "auth_enabled", "knowledge", "adapters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    AUTH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    dtype: str
    uptime_seconds: float
    requests_in_flight: int
    requests_waiting: int
    version: str
    engine: EngineStatus
    model_path: str
    breaker: BreakerStatus
    limits: Limits
    degraded: DegradedSwitch
    draining: bool
    auth_enabled: bool
    knowledge: KnowledgeStatus
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., requests_in_flight: _Optional[int] = ..., requests_waiting: _Optional[int] = ..., version: _Optional[str] = ..., engine: _Optional[_Union[EngineStatus, _Mapping]] = ..., model_path: _Optional[str] = ..., breaker: _Optional[_Union[BreakerStatus, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., degraded: _Optional[_Union[DegradedSwitch, _Mapping]] = ..., draining: _Optional[bool] = ..., auth_enabled: _Optional[bool] = ..., knowledge: _Optional[_Union[KnowledgeStatus, _Mapping]] = ..., adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ...) -> None: ...

class KnowledgeStatus(_message.Message):
    __slots__ = ("backend", "version", "articles", "documents")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTICLES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    version: int
    articles: int
    documents: int
    def __init__(self, backend: _Optional[str] = ..., version: _Optional[int] = ..., articles: _Optional[int] = ..., documents: _Optional[int] = ...) -> None: ...

class KnowledgeDocument(_message.Message):
    __slots__ = ("id", "law", "article", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    LAW_FIELD_NUMBER: _ClassVar[int]
    ARTICLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    law: str
    article: str
    text: str
    def __init__(self, id: _Optional[str] = ..., law: _Optional[str] = ..., article: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class AddDocumentsRequest(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[KnowledgeDocument]
    def __init__(self, documents: _Optional[_Iterable[_Union[KnowledgeDocument, _Mapping]]] = ...) -> None: ...

class AddDocumentsResponse(_message.Message):
    __slots__ = ("added", "replaced", "knowledge")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    added: int
    replaced: int
    knowledge: KnowledgeStatus
    def __init__(self, added: _Optional[int] = ..., replaced: _Optional[int] = ..., knowledge: _Optional[_Union[KnowledgeStatus, _Mapping]] = ...) -> None: ...

class DeleteDocumentsRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteDocumentsResponse(_message.Message):
    __slots__ = ("deleted", "not_found", "knowledge")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    not_found: _containers.RepeatedScalarFieldContainer[str]
    knowledge: KnowledgeStatus
    def __init__(self, deleted: _Optional[int] = ..., not_found: _Optional[_Iterable[str]] = ..., knowledge: _Optional[_Union[KnowledgeStatus, _Mapping]] = ...) -> None: ...

class BreakerStatus(_message.Message):
    __slots__ = ("state", "consecutive_failures", "failure_threshold", "open_remaining_seconds", "last_failure")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OPEN_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    state: BreakerState
    consecutive_failures: int
    failure_threshold: int
    open_remaining_seconds: float
    last_failure: str
    def __init__(self, state: _Optional[_Union[BreakerState, str]] = ..., consecutive_failures: _Optional[int] = ..., failure_threshold: _Optional[int] = ..., open_remaining_seconds: _Optional[float] = ..., last_failure: _Optional[str] = ...) -> None: ...

class DegradedSwitch(_message.Message):
    __slots__ = ("enabled", "reason")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reason: str
    def __init__(self, enabled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("rate", "burst")
    RATE_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    rate: float
    burst: float
    def __init__(self, rate: _Optional[float] = ..., burst: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("global_requests", "global_tokens", "client_requests", "client_tokens")
    GLOBAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    global_requests: RateLimit
    global_tokens: RateLimit
    client_requests: RateLimit
    client_tokens: RateLimit
    def __init__(self, global_requests: _Optional[_Union[RateLimit, _Mapping]] = ..., global_tokens: _Optional[_Union[RateLimit, _Mapping]] = ..., client_requests: _Optional[_Union[RateLimit, _Mapping]] = ..., client_tokens: _Optional[_Union[RateLimit, _Mapping]] = ...) -> None: ...

class SetDegradedRequest(_message.Message):
    __slots__ = ("enabled", "reason")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    reason: str
    def __init__(self, enabled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetDegradedResponse(_message.Message):
    __slots__ = ("degraded",)
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    degraded: DegradedSwitch
    def __init__(self, degraded: _Optional[_Union[DegradedSwitch, _Mapping]] = ...) -> None: ...

class UpdateLimitsRequest(_message.Message):
    __slots__ = ("limits",)
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    limits: Limits
    def __init__(self, limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class UpdateLimitsResponse(_message.Message):
    __slots__ = ("limits",)
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    limits: Limits
    def __init__(self, limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model_path",)
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    def __init__(self, model_path: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model_path", "previous_model_path", "load_seconds")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    previous_model_path: str
    load_seconds: float
    def __init__(self, model_path: _Optional[str] = ..., previous_model_path: _Optional[str] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drained", "in_flight")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    in_flight: int
    def __init__(self, drained: _Optional[bool] = ..., in_flight: _Optional[int] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("path", "attention", "cuda_graph_batch_sizes", "batch_size", "kv_blocks_used", "kv_blocks_total", "kv_block_size", "prefix_cache_hit_rate", "preemptions", "max_len")
    PATH_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPH_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    path: str
    attention: str
    cuda_graph_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    batch_size: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_block_size: int
    prefix_cache_hit_rate: float
    preemptions: int
    max_len: int
    def __init__(self, path: _Optional[str] = ..., attention: _Optional[str] = ..., cuda_graph_batch_sizes: _Optional[_Iterable[int]] = ..., batch_size: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_block_size: _Optional[int] = ..., prefix_cache_hit_rate: _Optional[float] = ..., preemptions: _Optional[int] = ..., max_len: _Optional[int] = ...) -> None: ...
