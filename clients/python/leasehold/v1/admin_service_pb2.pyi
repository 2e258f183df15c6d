import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from leasehold.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListRuntimesRequest(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: _types_pb2.RuntimeStatus
    def __init__(self, status: _Optional[_Union[_types_pb2.RuntimeStatus, str]] = ...) -> None: ...

class ListRuntimesResponse(_message.Message):
    __slots__ = ("runtimes",)
    RUNTIMES_FIELD_NUMBER: _ClassVar[int]
    runtimes: _containers.RepeatedCompositeFieldContainer[_types_pb2.Runtime]
    def __init__(self, runtimes: _Optional[_Iterable[_Union[_types_pb2.Runtime, _Mapping]]] = ...) -> None: ...

class DescribeQueueRequest(_message.Message):
    __slots__ = ("queue",)
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    queue: str
    def __init__(self, queue: _Optional[str] = ...) -> None: ...

class TaskCounts(_message.Message):
    __slots__ = ("queued", "dispatched", "running", "completed", "failed", "cancelled")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    queued: int
    dispatched: int
    running: int
    completed: int
    failed: int
    cancelled: int
    def __init__(self, queued: _Optional[int] = ..., dispatched: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ...) -> None: ...

class DescribeQueueResponse(_message.Message):
    __slots__ = ("queue", "max_concurrent", "paused", "counts", "oldest_queued_at")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    queue: str
    max_concurrent: int
    paused: bool
    counts: TaskCounts
    oldest_queued_at: _timestamp_pb2.Timestamp
    def __init__(self, queue: _Optional[str] = ..., max_concurrent: _Optional[int] = ..., paused: _Optional[bool] = ..., counts: _Optional[_Union[TaskCounts, _Mapping]] = ..., oldest_queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UpdateQueueRequest(_message.Message):
    __slots__ = ("queue", "max_concurrent", "paused")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    queue: str
    max_concurrent: int
    paused: bool
    def __init__(self, queue: _Optional[str] = ..., max_concurrent: _Optional[int] = ..., paused: _Optional[bool] = ...) -> None: ...

class RetryTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class RetryTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ...) -> None: ...
