//! Row types and their conversion into domain types. A row that does not convert (an unknown
//! status spelling, a negative counter) is reported as an internal error, never guessed at.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::{
    ClaimEnd, ClaimToken, Error, FailureReason, PreviousClaim, Result, Runtime, RuntimeId,
    RuntimeStatus, Task, TaskId, TaskStatus,
};
use crate::store::{ClaimHorizon, TaskMove};

#[derive(sqlx::FromRow)]
pub(super) struct TaskRow {
    id: Uuid,
    queue: String,
    runtime_id: Option<Uuid>,
    concurrency_key: Option<String>,
    priority: i32,
    payload: Vec<u8>,
    metadata: Json<BTreeMap<String, String>>,
    status: String,
    attempt: i64,
    max_attempts: i64,
    lease_expirations: i64,
    claimed_by: Option<Uuid>,
    claim_token: Option<Uuid>,
    previous_claim_token: Option<Uuid>,
    previous_claim_end: Option<String>,
    idempotency_key: Option<String>,
    execution_timeout_ms: Option<i64>,
    created_at: DateTime<Utc>,
    available_at: DateTime<Utc>,
    dispatched_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    result: Option<Vec<u8>>,
    error: Option<String>,
    failure_reason: Option<String>,
}

impl TaskRow {
    pub(super) fn id(&self) -> Uuid {
        self.id
    }
}

/// A task row read together with the database clock, for judging its lease.
#[derive(sqlx::FromRow)]
pub(super) struct FenceSnapshot {
    #[sqlx(flatten)]
    pub(super) task: TaskRow,
    pub(super) db_now: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct RuntimeRow {
    id: Uuid,
    name: String,
    queues: Vec<String>,
    labels: Json<BTreeMap<String, String>>,
    max_concurrency: i64,
    status: String,
    last_seen_at: DateTime<Utc>,
    registered_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct QueueRow {
    pub(super) max_concurrent: i64,
    pub(super) paused: bool,
    pub(super) default_execution_timeout_ms: Option<i64>,
    pub(super) queued: i64,
    pub(super) dispatched: i64,
    pub(super) running: i64,
    pub(super) completed: i64,
    pub(super) failed: i64,
    pub(super) cancelled: i64,
    pub(super) oldest_queued_at: Option<DateTime<Utc>>,
}

/// A row of `sql::QUEUE_OVERVIEW`.
#[derive(sqlx::FromRow)]
pub(super) struct OverviewRow {
    pub(super) name: String,
    #[sqlx(flatten)]
    pub(super) counts: QueueRow,
    pub(super) counted_at: Option<DateTime<Utc>>,
}

/// The columns of `sql::task_move_columns!`.
#[derive(sqlx::FromRow)]
pub(super) struct MoveRow {
    id: Uuid,
    queue: String,
    runtime_id: Option<Uuid>,
    status: String,
    available_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct HorizonRow {
    queues: Vec<String>,
    own_lease_secs: Option<f64>,
    next_available_secs: Option<f64>,
}

impl TryFrom<MoveRow> for TaskMove {
    type Error = Error;

    fn try_from(row: MoveRow) -> Result<TaskMove> {
        Ok(TaskMove {
            task_id: TaskId::from_uuid(row.id),
            queue: row.queue,
            pinned_to: row.runtime_id.map(RuntimeId::from_uuid),
            status: TaskStatus::parse(&row.status).ok_or_else(|| corrupt("status", &row.status))?,
            available_at: row.available_at,
        })
    }
}

impl From<HorizonRow> for ClaimHorizon {
    fn from(row: HorizonRow) -> ClaimHorizon {
        // Negative (already passed) becomes zero: no time left to trust a verdict for.
        let seconds = |secs: f64| Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or_default();
        let mut queues = row.queues;
        queues.sort();
        ClaimHorizon {
            queues,
            own_lease: row.own_lease_secs.map(seconds),
            next_available: row.next_available_secs.map(seconds),
        }
    }
}

pub(super) fn moves(rows: Vec<MoveRow>) -> Result<Vec<TaskMove>> {
    rows.into_iter().map(TaskMove::try_from).collect()
}

impl TryFrom<TaskRow> for Task {
    type Error = Error;

    fn try_from(row: TaskRow) -> Result<Task> {
        let previous_claim = match (row.previous_claim_token, row.previous_claim_end.as_deref()) {
            (Some(token), Some(end)) => Some(PreviousClaim {
                token: ClaimToken::from_uuid(token),
                end: ClaimEnd::parse(end).ok_or_else(|| corrupt("previous_claim_end", end))?,
            }),
            _ => None,
        };
        let failure_reason = row
            .failure_reason
            .as_deref()
            .map(|reason| {
                FailureReason::parse(reason).ok_or_else(|| corrupt("failure_reason", reason))
            })
            .transpose()?;
        Ok(Task {
            id: TaskId::from_uuid(row.id),
            queue: row.queue,
            runtime_id: row.runtime_id.map(RuntimeId::from_uuid),
            concurrency_key: row.concurrency_key,
            priority: row.priority,
            payload: row.payload,
            metadata: row.metadata.0,
            status: TaskStatus::parse(&row.status).ok_or_else(|| corrupt("status", &row.status))?,
            attempt: to_u32("attempt", row.attempt)?,
            max_attempts: to_u32("max_attempts", row.max_attempts)?,
            lease_expirations: to_u32("lease_expirations", row.lease_expirations)?,
            claimed_by: row.claimed_by.map(RuntimeId::from_uuid),
            claim_token: row.claim_token.map(ClaimToken::from_uuid),
            previous_claim,
            idempotency_key: row.idempotency_key,
            execution_timeout: row
                .execution_timeout_ms
                .map(|ms| u64::try_from(ms).map(Duration::from_millis))
                .transpose()
                .map_err(|_| corrupt("execution_timeout_ms", "negative"))?,
            created_at: row.created_at,
            available_at: row.available_at,
            dispatched_at: row.dispatched_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
            lease_expires_at: row.lease_expires_at,
            result: row.result,
            error: row.error,
            failure_reason,
        })
    }
}

impl TryFrom<RuntimeRow> for Runtime {
    type Error = Error;

    fn try_from(row: RuntimeRow) -> Result<Runtime> {
        Ok(Runtime {
            id: RuntimeId::from_uuid(row.id),
            name: row.name,
            queues: row.queues,
            labels: row.labels.0,
            max_concurrency: to_u32("max_concurrency", row.max_concurrency)?,
            status: RuntimeStatus::parse(&row.status)
                .ok_or_else(|| corrupt("runtime status", &row.status))?,
            last_seen_at: row.last_seen_at,
            registered_at: row.registered_at,
        })
    }
}

pub(super) fn to_u32(column: &str, value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| corrupt(column, &value.to_string()))
}

pub(super) fn to_u64(column: &str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| corrupt(column, &value.to_string()))
}

fn corrupt(column: &str, value: &str) -> Error {
    Error::Internal(format!("unexpected stored value for {column}: {value:?}").into())
}
