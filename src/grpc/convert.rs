//! Conversions between wire messages and domain types, and the parsing of wire fields.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::domain::auth::{ApiKey, Grant};
use crate::domain::{
    ClaimToken, ClaimedTask, Error, FailureReason, QueueInfo, Result, Runtime, RuntimeId,
    RuntimeStatus, Task, TaskId, TaskStatus,
};

use crate::proto as pb;

/// Also records the id on the RPC's span (see `observe`), so every log line of the call
/// names its task.
pub(crate) fn task_id(field: &str, text: &str) -> Result<TaskId> {
    let task_id = required_uuid(field, text, TaskId::parse)?;
    tracing::Span::current().record("task_id", tracing::field::display(task_id));
    Ok(task_id)
}

/// Also records the id on the RPC's span.
pub(crate) fn runtime_id(field: &str, text: &str) -> Result<RuntimeId> {
    let runtime_id = required_uuid(field, text, RuntimeId::parse)?;
    tracing::Span::current().record("runtime_id", tracing::field::display(runtime_id));
    Ok(runtime_id)
}

/// An optional runtime id: empty means none.
pub(crate) fn optional_runtime_id(field: &str, text: &str) -> Result<Option<RuntimeId>> {
    if text.is_empty() {
        return Ok(None);
    }
    runtime_id(field, text).map(Some)
}

fn required_uuid<T>(field: &str, text: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    if text.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    parse(text).ok_or_else(|| Error::invalid(field, "is not a UUID"))
}

pub(crate) fn key_id(field: &str, text: &str) -> Result<uuid::Uuid> {
    required_uuid(field, text, |text| uuid::Uuid::try_parse(text).ok())
}

/// API key scopes: each `scope` or `scope:<queue glob>`.
pub(crate) fn grants(field: &str, scopes: &[String]) -> Result<Vec<Grant>> {
    scopes
        .iter()
        .map(|scope| {
            scope
                .parse::<Grant>()
                .map_err(|error| Error::invalid(field, error))
        })
        .collect()
}

/// An API key as listed: never its secret.
pub(crate) fn api_key(key: ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: key.id.to_string(),
        name: key.name,
        scopes: key.grants.iter().map(ToString::to_string).collect(),
        created_at: Some(timestamp(key.created_at)),
        expires_at: key.expires_at.map(timestamp),
        last_used_at: key.last_used_at.map(timestamp),
        revoked_at: key.revoked_at.map(timestamp),
    }
}

pub(crate) fn claim_token(text: &str) -> Result<ClaimToken> {
    ClaimToken::parse(text).ok_or(Error::MalformedClaimToken)
}

/// A wire duration; negative ones are rejected, absent stays absent.
pub(crate) fn duration(
    field: &str,
    duration: Option<prost_types::Duration>,
) -> Result<Option<Duration>> {
    let Some(duration) = duration else {
        return Ok(None);
    };
    if duration.seconds < 0 || duration.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    let duration = Duration::try_from(duration)
        .map_err(|_| Error::invalid(field, "is not a valid duration"))?;
    crate::domain::validate::duration(field, duration)?;
    Ok(Some(duration))
}

pub(crate) fn wire_duration(duration: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(duration.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// RFC 3339 with microseconds, for error metadata.
pub(crate) fn timestamp_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn task_status_from_wire(field: &str, value: i32) -> Result<TaskStatus> {
    match pb::TaskStatus::try_from(value) {
        Ok(pb::TaskStatus::Queued) => Ok(TaskStatus::Queued),
        Ok(pb::TaskStatus::Dispatched) => Ok(TaskStatus::Dispatched),
        Ok(pb::TaskStatus::Running) => Ok(TaskStatus::Running),
        Ok(pb::TaskStatus::Completed) => Ok(TaskStatus::Completed),
        Ok(pb::TaskStatus::Failed) => Ok(TaskStatus::Failed),
        Ok(pb::TaskStatus::Cancelled) => Ok(TaskStatus::Cancelled),
        Ok(pb::TaskStatus::Unspecified) | Err(_) => Err(Error::invalid(
            field,
            format!("{value} is not a task status"),
        )),
    }
}

/// The optional status filter of ListRuntimes: absent or UNSPECIFIED = any status.
pub(crate) fn runtime_status_filter(
    field: &str,
    value: Option<i32>,
) -> Result<Option<RuntimeStatus>> {
    match value.map(pb::RuntimeStatus::try_from) {
        None | Some(Ok(pb::RuntimeStatus::Unspecified)) => Ok(None),
        Some(Ok(pb::RuntimeStatus::Online)) => Ok(Some(RuntimeStatus::Online)),
        Some(Ok(pb::RuntimeStatus::Offline)) => Ok(Some(RuntimeStatus::Offline)),
        Some(Err(_)) => Err(Error::invalid(
            field,
            format!("{} is not a runtime status", value.unwrap_or_default()),
        )),
    }
}

pub(crate) fn task_status(status: TaskStatus) -> pb::TaskStatus {
    match status {
        TaskStatus::Queued => pb::TaskStatus::Queued,
        TaskStatus::Dispatched => pb::TaskStatus::Dispatched,
        TaskStatus::Running => pb::TaskStatus::Running,
        TaskStatus::Completed => pb::TaskStatus::Completed,
        TaskStatus::Failed => pb::TaskStatus::Failed,
        TaskStatus::Cancelled => pb::TaskStatus::Cancelled,
    }
}

/// The enum value's name as clients see it in the proto (`TASK_STATUS_RUNNING`).
pub(crate) fn task_status_name(status: TaskStatus) -> &'static str {
    task_status(status).as_str_name()
}

fn failure_reason(reason: FailureReason) -> pb::FailureReason {
    match reason {
        FailureReason::TaskError => pb::FailureReason::TaskError,
        FailureReason::RuntimeOffline => pb::FailureReason::RuntimeOffline,
        FailureReason::RuntimeRecovery => pb::FailureReason::RuntimeRecovery,
        FailureReason::DispatchTimeout => pb::FailureReason::DispatchTimeout,
        FailureReason::ExecutionTimeout => pb::FailureReason::ExecutionTimeout,
        FailureReason::LeaseExpiredTooOften => pb::FailureReason::LeaseExpiredTooOften,
        FailureReason::QueuedExpired => pb::FailureReason::QueuedExpired,
        FailureReason::RuntimeGone => pb::FailureReason::RuntimeGone,
        FailureReason::Cancelled => pb::FailureReason::Cancelled,
    }
}

pub(crate) fn runtime_status(status: RuntimeStatus) -> pb::RuntimeStatus {
    match status {
        RuntimeStatus::Online => pb::RuntimeStatus::Online,
        RuntimeStatus::Offline => pb::RuntimeStatus::Offline,
    }
}

/// The wire task. The claim token is deliberately not part of it.
pub(crate) fn task(task: Task) -> pb::Task {
    pb::Task {
        id: task.id.to_string(),
        queue: task.queue,
        runtime_id: task.runtime_id.map(|id| id.to_string()).unwrap_or_default(),
        concurrency_key: task.concurrency_key.unwrap_or_default(),
        priority: task.priority,
        payload: task.payload,
        metadata: task.metadata.into_iter().collect(),
        status: task_status(task.status).into(),
        attempt: task.attempt,
        max_attempts: task.max_attempts,
        lease_expirations: task.lease_expirations,
        claimed_by: task.claimed_by.map(|id| id.to_string()).unwrap_or_default(),
        idempotency_key: task.idempotency_key.unwrap_or_default(),
        created_at: Some(timestamp(task.created_at)),
        available_at: Some(timestamp(task.available_at)),
        dispatched_at: task.dispatched_at.map(timestamp),
        started_at: task.started_at.map(timestamp),
        finished_at: task.finished_at.map(timestamp),
        lease_expires_at: task.lease_expires_at.map(timestamp),
        result: task.result.unwrap_or_default(),
        error: task.error.unwrap_or_default(),
        failure_reason: task
            .failure_reason
            .map_or(pb::FailureReason::Unspecified, failure_reason)
            .into(),
    }
}

pub(crate) fn claimed_task(claimed: ClaimedTask) -> pb::ClaimedTask {
    pb::ClaimedTask {
        claim_token: claimed.claim_token.expose(),
        lease_expires_at: Some(timestamp(claimed.lease_expires_at)),
        task: Some(task(claimed.task)),
    }
}

pub(crate) fn runtime(runtime: Runtime) -> pb::Runtime {
    pb::Runtime {
        id: runtime.id.to_string(),
        name: runtime.name,
        queues: runtime.queues,
        labels: runtime.labels.into_iter().collect(),
        max_concurrency: runtime.max_concurrency,
        status: runtime_status(runtime.status).into(),
        last_seen_at: Some(timestamp(runtime.last_seen_at)),
        registered_at: Some(timestamp(runtime.registered_at)),
    }
}

pub(crate) fn queue(info: QueueInfo) -> pb::DescribeQueueResponse {
    let counts = info.counts;
    pb::DescribeQueueResponse {
        queue: info.name,
        max_concurrent: info.max_concurrent,
        paused: info.paused,
        counts: Some(pb::TaskCounts {
            queued: counts.queued,
            dispatched: counts.dispatched,
            running: counts.running,
            completed: counts.completed,
            failed: counts.failed,
            cancelled: counts.cancelled,
        }),
        oldest_queued_at: info.oldest_queued_at.map(timestamp),
        default_execution_timeout: info.default_execution_timeout.map(wire_duration),
    }
}
