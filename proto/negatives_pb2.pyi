from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class SamplePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLE_POLICY_UNSPECIFIED: _ClassVar[SamplePolicy]
    SAMPLE_POLICY_UNIFORM: _ClassVar[SamplePolicy]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
SAMPLE_POLICY_UNSPECIFIED: SamplePolicy
SAMPLE_POLICY_UNIFORM: SamplePolicy

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("embeddings", "version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    version: int
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("accepted", "queue_version", "quota_remaining")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUOTA_REMAINING_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    queue_version: int
    quota_remaining: int
    def __init__(self, accepted: _Optional[int] = ..., queue_version: _Optional[int] = ..., quota_remaining: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("count", "max_age", "exclude_own", "dtype", "policy", "include_versions", "only_own", "max_version", "seed")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_OWN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWN_FIELD_NUMBER: _ClassVar[int]
    MAX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    count: int
    max_age: int
    exclude_own: bool
    dtype: DType
    policy: SamplePolicy
    include_versions: bool
    only_own: bool
    max_version: int
    seed: int
    def __init__(self, count: _Optional[int] = ..., max_age: _Optional[int] = ..., exclude_own: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ..., policy: _Optional[_Union[SamplePolicy, str]] = ..., include_versions: _Optional[bool] = ..., only_own: _Optional[bool] = ..., max_version: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("embeddings", "versions", "queue_version")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_VERSION_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    versions: _containers.RepeatedScalarFieldContainer[int]
    queue_version: int
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., versions: _Optional[_Iterable[int]] = ..., queue_version: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueCounters(_message.Message):
    __slots__ = ("push_calls", "pushed_rows", "pull_calls", "pulled_rows", "evicted_rows", "overwritten_rows")
    PUSH_CALLS_FIELD_NUMBER: _ClassVar[int]
    PUSHED_ROWS_FIELD_NUMBER: _ClassVar[int]
    PULL_CALLS_FIELD_NUMBER: _ClassVar[int]
    PULLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_ROWS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITTEN_ROWS_FIELD_NUMBER: _ClassVar[int]
    push_calls: int
    pushed_rows: int
    pull_calls: int
    pulled_rows: int
    evicted_rows: int
    overwritten_rows: int
    def __init__(self, push_calls: _Optional[int] = ..., pushed_rows: _Optional[int] = ..., pull_calls: _Optional[int] = ..., pulled_rows: _Optional[int] = ..., evicted_rows: _Optional[int] = ..., overwritten_rows: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("size", "capacity", "dim", "version", "max_age", "age_histogram", "counters", "rejected", "quota_per_version")
    class RejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    AGE_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    QUOTA_PER_VERSION_FIELD_NUMBER: _ClassVar[int]
    size: int
    capacity: int
    dim: int
    version: int
    max_age: int
    age_histogram: _containers.RepeatedScalarFieldContainer[int]
    counters: QueueCounters
    rejected: _containers.ScalarMap[str, int]
    quota_per_version: int
    def __init__(self, size: _Optional[int] = ..., capacity: _Optional[int] = ..., dim: _Optional[int] = ..., version: _Optional[int] = ..., max_age: _Optional[int] = ..., age_histogram: _Optional[_Iterable[int]] = ..., counters: _Optional[_Union[QueueCounters, _Mapping]] = ..., rejected: _Optional[_Mapping[str, int]] = ..., quota_per_version: _Optional[int] = ...) -> None: ...

class AdvanceRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class AdvanceResponse(_message.Message):
    __slots__ = ("version", "evicted")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    version: int
    evicted: int
    def __init__(self, version: _Optional[int] = ..., evicted: _Optional[int] = ...) -> None: ...
