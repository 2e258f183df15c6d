import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from leasehold.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRuntimeRequest(_message.Message):
    __slots__ = ("name", "queues", "labels", "max_concurrency")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    name: str
    queues: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    max_concurrency: int
    def __init__(self, name: _Optional[str] = ..., queues: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class RegisterRuntimeResponse(_message.Message):
    __slots__ = ("runtime", "heartbeat_interval", "lease_duration", "runtime_token")
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runtime: _types_pb2.Runtime
    heartbeat_interval: _duration_pb2.Duration
    lease_duration: _duration_pb2.Duration
    runtime_token: str
    def __init__(self, runtime: _Optional[_Union[_types_pb2.Runtime, _Mapping]] = ..., heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., runtime_token: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("runtime_id",)
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    def __init__(self, runtime_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("server_time", "status")
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    server_time: _timestamp_pb2.Timestamp
    status: _types_pb2.RuntimeStatus
    def __init__(self, server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[_types_pb2.RuntimeStatus, str]] = ...) -> None: ...

class DeregisterRuntimeRequest(_message.Message):
    __slots__ = ("runtime_id",)
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    def __init__(self, runtime_id: _Optional[str] = ...) -> None: ...

class DeregisterRuntimeResponse(_message.Message):
    __slots__ = ("requeued",)
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    requeued: int
    def __init__(self, requeued: _Optional[int] = ...) -> None: ...

class RecoverOrphansRequest(_message.Message):
    __slots__ = ("runtime_id",)
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    def __init__(self, runtime_id: _Optional[str] = ...) -> None: ...

class RecoverOrphansResponse(_message.Message):
    __slots__ = ("failed", "retried")
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    failed: int
    retried: int
    def __init__(self, failed: _Optional[int] = ..., retried: _Optional[int] = ...) -> None: ...

class ClaimTaskRequest(_message.Message):
    __slots__ = ("runtime_id", "max_tasks", "wait")
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    max_tasks: int
    wait: _duration_pb2.Duration
    def __init__(self, runtime_id: _Optional[str] = ..., max_tasks: _Optional[int] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ClaimTaskResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_types_pb2.ClaimedTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_types_pb2.ClaimedTask, _Mapping]]] = ...) -> None: ...

class StreamClaimsRequest(_message.Message):
    __slots__ = ("open", "credit", "ack", "write")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    WRITE_FIELD_NUMBER: _ClassVar[int]
    open: OpenStream
    credit: GrantCredit
    ack: AckClaim
    write: StreamWrite
    def __init__(self, open: _Optional[_Union[OpenStream, _Mapping]] = ..., credit: _Optional[_Union[GrantCredit, _Mapping]] = ..., ack: _Optional[_Union[AckClaim, _Mapping]] = ..., write: _Optional[_Union[StreamWrite, _Mapping]] = ...) -> None: ...

class OpenStream(_message.Message):
    __slots__ = ("runtime_id", "credits", "auto_start")
    RUNTIME_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    AUTO_START_FIELD_NUMBER: _ClassVar[int]
    runtime_id: str
    credits: int
    auto_start: bool
    def __init__(self, runtime_id: _Optional[str] = ..., credits: _Optional[int] = ..., auto_start: _Optional[bool] = ...) -> None: ...

class GrantCredit(_message.Message):
    __slots__ = ("n",)
    N_FIELD_NUMBER: _ClassVar[int]
    n: int
    def __init__(self, n: _Optional[int] = ...) -> None: ...

class AckClaim(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StreamWrite(_message.Message):
    __slots__ = ("request_id", "start", "complete", "fail", "credit")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    FAIL_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    start: StartTaskRequest
    complete: CompleteTaskRequest
    fail: FailTaskRequest
    credit: int
    def __init__(self, request_id: _Optional[int] = ..., start: _Optional[_Union[StartTaskRequest, _Mapping]] = ..., complete: _Optional[_Union[CompleteTaskRequest, _Mapping]] = ..., fail: _Optional[_Union[FailTaskRequest, _Mapping]] = ..., credit: _Optional[int] = ...) -> None: ...

class StreamClaimsResponse(_message.Message):
    __slots__ = ("claimed", "cancelled", "keepalive", "draining", "written")
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    claimed: _types_pb2.ClaimedTask
    cancelled: TaskCancelled
    keepalive: Keepalive
    draining: Draining
    written: StreamWritten
    def __init__(self, claimed: _Optional[_Union[_types_pb2.ClaimedTask, _Mapping]] = ..., cancelled: _Optional[_Union[TaskCancelled, _Mapping]] = ..., keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., draining: _Optional[_Union[Draining, _Mapping]] = ..., written: _Optional[_Union[StreamWritten, _Mapping]] = ...) -> None: ...

class StreamWritten(_message.Message):
    __slots__ = ("request_id", "task", "will_retry", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    WILL_RETRY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    task: _types_pb2.Task
    will_retry: bool
    error: _status_pb2.Status
    def __init__(self, request_id: _Optional[int] = ..., task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., will_retry: _Optional[bool] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class TaskCancelled(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("server_time",)
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_time: _timestamp_pb2.Timestamp
    def __init__(self, server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Draining(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StartTaskRequest(_message.Message):
    __slots__ = ("task_id", "claim_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: str
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[str] = ...) -> None: ...

class StartTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("task_id", "claim_token", "extend_by")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXTEND_BY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: str
    extend_by: _duration_pb2.Duration
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[str] = ..., extend_by: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("lease_expires_at",)
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("task_id", "claim_token", "result")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: str
    result: bytes
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[str] = ..., result: _Optional[bytes] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ...) -> None: ...

class FailTaskRequest(_message.Message):
    __slots__ = ("task_id", "claim_token", "error", "retryable")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: str
    error: str
    retryable: bool
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[str] = ..., error: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class FailTaskResponse(_message.Message):
    __slots__ = ("task", "will_retry")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WILL_RETRY_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    will_retry: bool
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., will_retry: _Optional[bool] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("task_id", "claim_token", "counters")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    claim_token: str
    counters: _containers.ScalarMap[str, int]
    def __init__(self, task_id: _Optional[str] = ..., claim_token: _Optional[str] = ..., counters: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTaskStatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class GetTaskStatusResponse(_message.Message):
    __slots__ = ("status", "attempt")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    status: _types_pb2.TaskStatus
    attempt: int
    def __init__(self, status: _Optional[_Union[_types_pb2.TaskStatus, str]] = ..., attempt: _Optional[int] = ...) -> None: ...
