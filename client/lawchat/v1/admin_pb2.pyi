from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("model", "device", "dtype", "uptime_seconds", "requests_in_flight", "requests_waiting", "version", "engine")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_WAITING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    model: str
    device: str
    dtype: str
    uptime_seconds: float
    requests_in_flight: int
    requests_waiting: int
    version: str
    engine: EngineStatus
    def __init__(self, model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., requests_in_flight: _Optional[int] = ..., requests_waiting: _Optional[int] = ..., version: _Optional[str] = ..., engine: _Optional[_Union[EngineStatus, _Mapping]] = ...) -> None: ...

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
