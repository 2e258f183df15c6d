//! Owner writes (start, extend, complete, fail, usage) as fenced writes: one guarded statement
//! that applies only for the current claim token; when it matches no row, one more read lets
//! the fence (`domain::fence`) say whether this was a replay or why it is refused.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::errors::plain;
use super::pooler::run;
use super::rows::{FenceSnapshot, TaskRow};
use super::{PgStore, coalesce, interval, sql};
use crate::domain::fence::{self, OwnerWrite, Verdict};
use crate::domain::{ClaimToken, Error, Result, RuntimeId, Task, TaskId};
use crate::store::{Failure, LeaseRenewal};
use coalesce::Shared;

/// A fenced write that matched no row is re-judged; if the judgement says it should have
/// applied (the row moved between the two statements), it is tried again this many times.
pub(super) const FENCED_WRITE_ATTEMPTS: usize = 3;

/// The owner writes that run as one guarded statement.
pub(super) enum GuardedWrite<'a> {
    Start,
    ExtendLease(Duration),
    Complete(&'a [u8]),
    Fail(&'a Failure),
}

impl GuardedWrite<'_> {
    fn kind(&self) -> OwnerWrite {
        match self {
            GuardedWrite::Start => OwnerWrite::Start,
            GuardedWrite::ExtendLease(_) => OwnerWrite::ExtendLease,
            GuardedWrite::Complete(_) => OwnerWrite::Complete,
            GuardedWrite::Fail(_) => OwnerWrite::Fail,
        }
    }
}

/// What a guarded statement returned.
pub(super) enum Applied {
    Task(Box<Task>),
    Lease(LeaseRenewal),
}

/// How a fenced write ended when it did not fail.
pub(super) enum Fenced {
    Applied(Applied),
    /// A replay: the same write already applied with this token. Carries the current row.
    Replayed(Box<Task>),
}

impl PgStore {
    /// Runs the guarded statement for `write`; when it matches no row, reads the row and lets
    /// the fence say whether this was a replay or why it is refused.
    pub(super) async fn fenced(
        &self,
        write: GuardedWrite<'_>,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Fenced> {
        for attempt in 0..FENCED_WRITE_ATTEMPTS {
            let applied = if attempt == 0 {
                self.try_shared(&write, task_id, token, acting).await?
            } else {
                self.try_guarded(&write, task_id, token, acting).await?
            };
            if let Some(applied) = applied {
                return Ok(Fenced::Applied(applied));
            }
            let (task, now) = self.fence_snapshot(task_id).await?;
            let verdict = fence::judge(write.kind(), &task, token, now);
            if verdict != Verdict::Replay && fence::held_by_another(&task, acting) {
                return Err(Error::RuntimeMismatch);
            }
            match verdict {
                Verdict::Apply => continue,
                Verdict::Replay => return Ok(Fenced::Replayed(Box::new(task))),
                Verdict::Refuse(refusal) => return Err(Error::refused(refusal, &task)),
            }
        }
        Err(Error::Internal(
            "a fenced write kept racing with concurrent changes".into(),
        ))
    }

    /// The guarded statement, shared with concurrent writes of its kind where it can be (see
    /// [`coalesce`]); `None` when its guard matched no row.
    async fn try_shared(
        &self,
        write: &GuardedWrite<'_>,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Option<Applied>> {
        let shared = match write {
            GuardedWrite::Start => {
                self.starts
                    .write(coalesce::Start::new(task_id, token, acting))
                    .await
            }
            GuardedWrite::Complete(result) => {
                let write = coalesce::Complete::new(task_id, token, result, acting);
                self.completes.write(write).await
            }
            GuardedWrite::ExtendLease(_) | GuardedWrite::Fail(_) => Shared::RunAlone,
        };
        match shared {
            Shared::Applied(row) => applied_task(Ok(Some(*row))),
            Shared::NotApplied => Ok(None),
            Shared::RunAlone => self.try_guarded(write, task_id, token, acting).await,
        }
    }

    /// One guarded statement; `None` when its guard matched no row.
    async fn try_guarded(
        &self,
        write: &GuardedWrite<'_>,
        task_id: TaskId,
        claim_token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Option<Applied>> {
        let (task, token) = (task_id.as_uuid(), claim_token.as_uuid());
        let holder = acting.map(|runtime| runtime.as_uuid());
        match write {
            GuardedWrite::Start => {
                let write = coalesce::Start::new(task_id, claim_token, acting);
                applied_task(coalesce::alone(&self.db, write).await)
            }
            GuardedWrite::Complete(result) => {
                let write = coalesce::Complete::new(task_id, claim_token, result, acting);
                applied_task(coalesce::alone(&self.db, write).await)
            }
            GuardedWrite::Fail(failure) => {
                let backoff = self.policy.retry_backoff;
                let row = run!(
                    &self.db,
                    sqlx::query_as(sql::FAIL)
                        .bind(task)
                        .bind(token)
                        .bind(&failure.error)
                        .bind(failure.retryable)
                        .bind(backoff.base.as_secs_f64() * 1000.0)
                        .bind(backoff.max.as_secs_f64() * 1000.0)
                        .bind(failure.jitter)
                        .bind(holder),
                    fetch_optional
                )
                .await;
                applied_task(row)
            }
            GuardedWrite::ExtendLease(extend_by) => {
                let renewed: Option<(DateTime<Utc>, Option<Uuid>)> = run!(
                    &self.db,
                    sqlx::query_as(sql::EXTEND_LEASE)
                        .bind(task)
                        .bind(token)
                        .bind(interval(*extend_by))
                        .bind(holder),
                    fetch_optional
                )
                .await
                .map_err(plain)?;
                Ok(renewed.map(|(lease_expires_at, holder)| {
                    Applied::Lease(LeaseRenewal {
                        lease_expires_at,
                        runtime_id: holder.map(RuntimeId::from_uuid),
                    })
                }))
            }
        }
    }

    pub(super) async fn fence_snapshot(&self, task_id: TaskId) -> Result<(Task, DateTime<Utc>)> {
        let snapshot: Option<FenceSnapshot> = run!(
            &self.db,
            sqlx::query_as(sql::FENCE_SNAPSHOT).bind(task_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let snapshot = snapshot.ok_or(Error::TaskNotFound(task_id))?;
        Ok((snapshot.task.try_into()?, snapshot.db_now))
    }

    /// Whether every counter of this report is already stored with the same value.
    async fn usage_already_reported(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        names: &[String],
        values: &[i64],
    ) -> Result<bool> {
        let matching: i64 = run!(
            &self.db,
            sqlx::query_scalar(sql::MATCHING_USAGE)
                .bind(task_id.as_uuid())
                .bind(token.as_uuid())
                .bind(names)
                .bind(values),
            fetch_one
        )
        .await
        .map_err(plain)?;
        Ok(usize::try_from(matching).is_ok_and(|matching| matching == names.len()))
    }

    /// ReportUsage, fenced like the owner writes; answers the runtime holding the task.
    pub(super) async fn report_usage_fenced(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<Option<RuntimeId>> {
        let (names, values): (Vec<String>, Vec<i64>) = counters.into_iter().unzip();
        let holder = acting.map(|runtime| runtime.as_uuid());
        for _ in 0..FENCED_WRITE_ATTEMPTS {
            let (applied, holder, _written): (bool, Option<Uuid>, i64) = run!(
                &self.db,
                sqlx::query_as(sql::REPORT_USAGE)
                    .bind(task_id.as_uuid())
                    .bind(token.as_uuid())
                    .bind(&names)
                    .bind(&values)
                    .bind(holder),
                fetch_one
            )
            .await
            .map_err(plain)?;
            if applied {
                return Ok(holder.map(RuntimeId::from_uuid));
            }
            let (task, now) = self.fence_snapshot(task_id).await?;
            if !names.is_empty()
                && self
                    .usage_already_reported(task_id, token, &names, &values)
                    .await?
            {
                return Ok(task.claimed_by);
            }
            if fence::held_by_another(&task, acting) {
                return Err(Error::RuntimeMismatch);
            }
            match fence::judge(OwnerWrite::ReportUsage, &task, token, now) {
                Verdict::Apply => continue,
                Verdict::Replay => return Ok(task.claimed_by),
                Verdict::Refuse(refusal) => return Err(Error::refused(refusal, &task)),
            }
        }
        Err(Error::Internal(
            "a usage report kept racing with concurrent changes".into(),
        ))
    }
}

impl Fenced {
    pub(super) fn into_task(self) -> Result<Task> {
        match self {
            Fenced::Applied(Applied::Task(task)) | Fenced::Replayed(task) => Ok(*task),
            Fenced::Applied(Applied::Lease(_)) => Err(Error::Internal(
                "a task write answered with a lease expiry".into(),
            )),
        }
    }
}

/// A guarded statement's answer: the task when it applied.
fn applied_task(row: sqlx::Result<Option<TaskRow>>) -> Result<Option<Applied>> {
    row.map_err(plain)?
        .map(|row| Task::try_from(row).map(|task| Applied::Task(Box::new(task))))
        .transpose()
}
