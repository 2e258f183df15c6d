//! Reads and settings of queues, and pages of tasks.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::errors::plain;
use super::pooler::{Db, run};
use super::rows::{OverviewRow, QueueRow, TaskRow, to_u32, to_u64};
use super::sql;
use uuid::Uuid;

use crate::domain::{FailureReason, QueueInfo, Result, StatusCounts, Task, TaskId};
use crate::store::{
    AttemptFailure, MinuteCount, PageCursor, QueueDepth, QueueOverview, QueueUpdate, TaskFilter,
    TaskPage,
};

/// A page of tasks matching `filter`, oldest first (by `created_at`, then id).
pub(super) async fn list_tasks(
    db: &Db,
    filter: TaskFilter,
    after: Option<PageCursor>,
    page_size: u32,
) -> Result<TaskPage> {
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    // One extra row tells whether another page follows.
    let rows: Vec<TaskRow> = run!(
        db,
        sqlx::query_as(sql::LIST_TASKS)
            .bind(&filter.queue)
            .bind(&statuses)
            .bind(filter.runtime_id.map(|id| id.as_uuid()))
            .bind(after.map(|cursor| cursor.created_at))
            .bind(after.map(|cursor| cursor.id.as_uuid()))
            .bind(i64::from(page_size) + 1)
            .bind(filter.created_from)
            .bind(filter.created_before)
            .bind(&filter.idempotency_key),
        fetch_all
    )
    .await
    .map_err(plain)?;
    let mut tasks = rows
        .into_iter()
        .map(Task::try_from)
        .collect::<Result<Vec<_>>>()?;
    let next = if tasks.len() > page_size as usize {
        tasks.truncate(page_size as usize);
        tasks.last().map(|last| PageCursor {
            created_at: last.created_at,
            id: last.id,
        })
    } else {
        None
    };
    Ok(TaskPage { tasks, next })
}

/// The gauges the sweeper refreshes: per queue, along the partial indexes.
pub(super) async fn depths(db: &Db) -> Result<Vec<QueueDepth>> {
    // Only the sweeper asks, after its sweep: on its connections.
    let rows: Vec<(String, i64, i64, i64, Option<f64>)> =
        run!(db, sqlx::query_as(sql::QUEUE_DEPTHS), fetch_all)
            .await
            .map_err(plain)?;
    rows.into_iter()
        .map(|(queue, queued, dispatched, running, oldest)| {
            Ok(QueueDepth {
                queue,
                queued: to_u64("count", queued)?,
                dispatched: to_u64("count", dispatched)?,
                running: to_u64("count", running)?,
                oldest_queued_age: oldest
                    .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok()),
            })
        })
        .collect()
}

/// DescribeQueue, in constant time (the finished tally).
pub(super) async fn describe(db: &Db, queue: &str) -> Result<QueueInfo> {
    let row: QueueRow = run!(
        db,
        sqlx::query_as(sql::DESCRIBE_QUEUE).bind(queue),
        fetch_one
    )
    .await
    .map_err(plain)?;
    queue_info(queue.to_owned(), row)
}

/// The console's queue page, from the per-queue tables alone.
pub(super) async fn overview(db: &Db, limit: u32) -> Result<QueueOverview> {
    let rows: Vec<OverviewRow> = run!(
        db,
        sqlx::query_as(sql::QUEUE_OVERVIEW).bind(i64::from(limit)),
        fetch_all
    )
    .await
    .map_err(plain)?;
    let counted_at = rows.iter().filter_map(|row| row.counted_at).max();
    let queues = rows
        .into_iter()
        .map(|row| queue_info(row.name, row.counts))
        .collect::<Result<_>>()?;
    Ok(QueueOverview { queues, counted_at })
}

/// A task's failed attempts (migration 21).
pub(super) async fn task_failures(db: &Db, task_id: TaskId) -> Result<Vec<AttemptFailure>> {
    let rows: Vec<(i32, DateTime<Utc>, String, Option<String>)> = run!(
        db,
        sqlx::query_as(sql::TASK_FAILURES).bind(task_id.as_uuid()),
        fetch_all
    )
    .await
    .map_err(plain)?;
    rows.into_iter()
        .map(|(attempt, failed_at, reason, error)| {
            Ok(AttemptFailure {
                attempt: to_u32("attempt", i64::from(attempt))?,
                failed_at,
                reason: FailureReason::parse(&reason).ok_or_else(|| {
                    crate::domain::Error::Internal(
                        format!("unknown failure reason {reason}").into(),
                    )
                })?,
                error,
            })
        })
        .collect()
}

/// Tasks finished per queue and minute since `since`.
pub(super) async fn throughput(db: &Db, since: DateTime<Utc>) -> Result<Vec<MinuteCount>> {
    let rows: Vec<(String, DateTime<Utc>, i64, i64)> =
        run!(db, sqlx::query_as(sql::THROUGHPUT).bind(since), fetch_all)
            .await
            .map_err(plain)?;
    rows.into_iter()
        .map(|(queue, minute, completed, failed)| {
            Ok(MinuteCount {
                queue,
                minute,
                completed: to_u64("count", completed)?,
                failed: to_u64("count", failed)?,
            })
        })
        .collect()
}

fn queue_info(name: String, row: QueueRow) -> Result<QueueInfo> {
    Ok(QueueInfo {
        name,
        max_concurrent: to_u32("max_concurrent", row.max_concurrent)?,
        paused: row.paused,
        default_execution_timeout: row
            .default_execution_timeout_ms
            .map(|ms| Duration::from_millis(ms.unsigned_abs())),
        counts: StatusCounts {
            queued: to_u64("count", row.queued)?,
            dispatched: to_u64("count", row.dispatched)?,
            running: to_u64("count", row.running)?,
            completed: to_u64("count", row.completed)?,
            failed: to_u64("count", row.failed)?,
            cancelled: to_u64("count", row.cancelled)?,
        },
        oldest_queued_at: row.oldest_queued_at,
    })
}

/// UpdateQueue, answered as DescribeQueue.
pub(super) async fn update(db: &Db, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
    run!(
        db,
        sqlx::query(sql::UPDATE_QUEUE)
            .bind(queue)
            .bind(update.max_concurrent.map(i64::from))
            .bind(update.paused)
            .bind(update.default_execution_timeout.is_some())
            .bind(
                update
                    .default_execution_timeout
                    .flatten()
                    .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)),
            ),
        execute
    )
    .await
    .map_err(plain)?;
    describe(db, queue).await
}

/// A page of a bulk operation: the ids of `filter`'s tasks after `after`.
pub(super) async fn matching_task_ids(
    db: &Db,
    filter: &TaskFilter,
    after: Option<TaskId>,
    limit: u32,
) -> Result<Vec<TaskId>> {
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    let ids: Vec<Uuid> = run!(
        db,
        sqlx::query_scalar(sql::MATCHING_TASK_IDS)
            .bind(&filter.queue)
            .bind(&statuses)
            .bind(filter.runtime_id.map(|id| id.as_uuid()))
            .bind(after.map(|id| id.as_uuid()))
            .bind(i64::from(limit)),
        fetch_all
    )
    .await
    .map_err(plain)?;
    Ok(ids.into_iter().map(TaskId::from_uuid).collect())
}

/// Runs `statement` (CANCEL_MANY, RETRY_MANY) on `task_ids`: the rows it changed.
pub(super) async fn change_many(
    db: &Db,
    statement: &'static str,
    task_ids: &[TaskId],
) -> Result<Vec<Task>> {
    let ids: Vec<Uuid> = task_ids.iter().map(|id| id.as_uuid()).collect();
    let rows: Vec<TaskRow> = run!(db, sqlx::query_as(statement).bind(ids), fetch_all)
        .await
        .map_err(plain)?;
    rows.into_iter().map(Task::try_from).collect()
}
