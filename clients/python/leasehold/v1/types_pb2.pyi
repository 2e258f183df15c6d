import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_QUEUED: _ClassVar[TaskStatus]
    TASK_STATUS_DISPATCHED: _ClassVar[TaskStatus]
    TASK_STATUS_RUNNING: _ClassVar[TaskStatus]
    TASK_STATUS_COMPLETED: _ClassVar[TaskStatus]
    TASK_STATUS_FAILED: _ClassVar[TaskStatus]
    TASK_STATUS_CANCELLED: _ClassVar[TaskStatus]

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_TASK_ERROR: _ClassVar[FailureReason]
    FAILURE_REASON_RUNTIME_OFFLINE: _ClassVar[FailureReason]
    FAILURE_REASON_RUNTIME_RECOVERY: _ClassVar[FailureReason]
    FAILURE_REASON_DISPATCH_TIMEOUT: _ClassVar[FailureReason]
    FAILURE_REASON_EXECUTION_TIMEOUT: _ClassVar[FailureReason]
    FAILURE_REASON_LEASE_EXPIRED_TOO_OFTEN: _ClassVar[FailureReason]
    FAILURE_REASON_QUEUED_EXPIRED: _ClassVar[FailureReason]
    FAILURE_REASON_RUNTIME_GONE: _ClassVar[FailureReason]
    FAILURE_REASON_CANCELLED: _ClassVar[FailureReason]

class RuntimeStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUNTIME_STATUS_UNSPECIFIED: _ClassVar[RuntimeStatus]
    RUNTIME_STATUS_ONLINE: _ClassVar[RuntimeStatus]
    RUNTIME_STATUS_OFFLINE: _ClassVar[RuntimeStatus]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_QUEUED: TaskStatus
TASK_STATUS_DISPATCHED: TaskStatus
TASK_STATUS_RUNNING: TaskStatus
TASK_STATUS_COMPLETED: TaskStatus
TASK_STATUS_FAILED: TaskStatus
TASK_STATUS_CANCELLED: TaskStatus
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_TASK_ERROR: FailureReason
FAILURE_REASON_RUNTIME_OFFLINE: FailureReason
FAILURE_REASON_RUNTIME_RECOVERY: FailureReason
FAILURE_REASON_DISPATCH_TIMEOUT: FailureReason
FAILURE_REASON_EXECUTION_TIMEOUT: FailureReason
FAILURE_REASON_LEASE_EXPIRED_TOO_OFTEN: FailureReason
FAILURE_REASON_QUEUED_EXPIRED: FailureReason
FAILURE_REASON_RUNTIME_GONE: FailureReason
FAILURE_REASON_CANCELLED: FailureReason
RUNTIME_STATUS_UNSPECIFIED: RuntimeStatus
RUNTIME_STATUS_ONLINE: RuntimeStatus
RUNTIME_STATUS_OFFLINE: RuntimeStatus

class Task(_message.Message):
    __slots__ = ("id", "queue", "runtime_id", "concurrency_key", "priority", "payload", "metadata", "status", "attempt", "max_attempts", "lease_expirations", "claimed_by", "idempotency_key", "created_at", "available_at", "dispatched_at", "started_at", "finished_at", "lease_expires_at", "result", "error", "failure_reason")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRATIONS_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_BY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_AT_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    queue: str
    runtime_id: str
    concurrency_key: str
    priority: int
    payload: bytes
    metadata: _containers.ScalarMap[str, str]
    status: TaskStatus
    attempt: int
    max_attempts: int
    lease_expirations: int
    claimed_by: str
    idempotency_key: str
    created_at: _timestamp_pb2.Timestamp
    available_at: _timestamp_pb2.Timestamp
    dispatched_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    result: bytes
    error: str
    failure_reason: FailureReason
    def __init__(self, id: _Optional[str] = ..., queue: _Optional[str] = ..., runtime_id: _Optional[str] = ..., concurrency_key: _Optional[str] = ..., priority: _Optional[int] = ..., payload: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., status: _Optional[_Union[TaskStatus, str]] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., lease_expirations: _Optional[int] = ..., claimed_by: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., available_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dispatched_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[bytes] = ..., error: _Optional[str] = ..., failure_reason: _Optional[_Union[FailureReason, str]] = ...) -> None: ...

class TaskFilter(_message.Message):
    __slots__ = ("queue", "statuses", "runtime_id")
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    queue: str
    statuses: _containers.RepeatedScalarFieldContainer[TaskStatus]
    runtime_id: str
    def __init__(self, queue: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[TaskStatus, str]]] = ..., runtime_id: _Optional[str] = ...) -> None: ...

class ClaimedTask(_message.Message):
    __slots__ = ("task", "claim_token", "lease_expires_at")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    task: Task
    claim_token: str
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., claim_token: _Optional[str] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Runtime(_message.Message):
    __slots__ = ("id", "name", "queues", "labels", "max_concurrency", "status", "last_seen_at", "registered_at")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AT_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    max_concurrency: int
    status: RuntimeStatus
    last_seen_at: _timestamp_pb2.Timestamp
    registered_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., max_concurrency: _Optional[int] = ..., status: _Optional[_Union[RuntimeStatus, str]] = ..., last_seen_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
