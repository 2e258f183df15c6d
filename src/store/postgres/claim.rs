//! The claim (one statement, `sql::CLAIM_MANY`, for one claim or several: the preflight inside
//! it) and the give-back of a stream's unstarted claims.

use uuid::Uuid;

use super::errors::{Context, classify, plain};
use super::interval;
use super::pooler::{Db, run};
use super::rows::{self, MoveRow, TaskRow};
use super::sql;
use crate::domain::{ClaimToken, ClaimedTask, Error, Result, RuntimeId, Task, TaskId};
use crate::store::{ClaimOutcome, ClaimRequest, StorePolicy, TaskMove};

/// The claim alone: the preflight's moves and the claimed tasks.
pub(super) async fn claim(
    db: &Db,
    policy: &StorePolicy,
    request: ClaimRequest,
) -> Result<ClaimOutcome> {
    let rows = claim_many(db, policy, &[request])
        .await
        .map_err(|error| classify(error, Context::Runtime(request.runtime_id)))?;
    outcome(rows.into_iter().map(|row| row.task).collect())
}

/// A row of `CLAIM_MANY`: which claim (1-based, in the order given) it answers.
#[derive(sqlx::FromRow)]
pub(super) struct ClaimedRow {
    pub(super) request: i32,
    #[sqlx(flatten)]
    pub(super) task: TaskRow,
}

/// `claims` in one statement, each as if alone after the ones before it
/// (`functions/leasehold_claim_many.sql`).
pub(super) async fn claim_many(
    db: &Db,
    policy: &StorePolicy,
    claims: &[ClaimRequest],
) -> sqlx::Result<Vec<ClaimedRow>> {
    let runtimes: Vec<Uuid> = claims
        .iter()
        .map(|claim| claim.runtime_id.as_uuid())
        .collect();
    let max_tasks: Vec<i32> = claims
        .iter()
        .map(|claim| i32::try_from(claim.max_tasks).unwrap_or(i32::MAX))
        .collect();
    let auto_start: Vec<bool> = claims.iter().map(|claim| claim.auto_start).collect();
    let budgets: Vec<Option<_>> = claims
        .iter()
        .map(|claim| claim.budget.map(interval))
        .collect();
    run!(
        db,
        sqlx::query_as(sql::CLAIM_MANY)
            .bind(runtimes)
            .bind(max_tasks)
            .bind(auto_start)
            .bind(budgets)
            .bind(interval(policy.lease_duration))
            .bind(i64::from(policy.max_lease_expirations)),
        fetch_all
    )
    .await
}

/// A claim's rows, as the claim function returns them, sorted into its outcome.
pub(super) fn outcome(rows: Vec<TaskRow>) -> Result<ClaimOutcome> {
    // The function returns the preflight's rows (QUEUED, or FAILED by the poison guard)
    // and then the claimed rows (DISPATCHED, or RUNNING when auto-started).
    let mut outcome = ClaimOutcome::default();
    for row in rows {
        let task = Task::try_from(row)?;
        if task.status.is_active() {
            outcome.claimed.push(claimed(task)?);
        } else {
            outcome.preflight.push(TaskMove::from(&task));
        }
    }
    Ok(outcome)
}

/// Claims pushed on a stream that ended go back to QUEUED (`sql::EXPIRE_CLAIMS`).
pub(super) async fn expire(
    db: &Db,
    runtime_id: RuntimeId,
    claims: &[(TaskId, ClaimToken)],
) -> Result<Vec<TaskMove>> {
    let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = claims
        .iter()
        .map(|(task_id, token)| (task_id.as_uuid(), token.as_uuid()))
        .unzip();
    let rows: Vec<MoveRow> = run!(
        db,
        sqlx::query_as(sql::EXPIRE_CLAIMS)
            .bind(runtime_id.as_uuid())
            .bind(ids)
            .bind(tokens),
        fetch_all
    )
    .await
    .map_err(plain)?;
    rows::moves(rows)
}

fn claimed(task: Task) -> Result<ClaimedTask> {
    match (task.claim_token, task.lease_expires_at) {
        (Some(claim_token), Some(lease_expires_at)) => Ok(ClaimedTask {
            claim_token,
            lease_expires_at,
            task,
        }),
        _ => Err(Error::Internal(
            "a claimed row came back without its token or lease".into(),
        )),
    }
}
