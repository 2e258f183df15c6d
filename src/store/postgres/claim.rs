//! The claim (one statement: `sql::CLAIM`, the preflight inside it) and the give-back of a
//! stream's unstarted claims.

use uuid::Uuid;

use super::errors::{Context, classify, plain};
use super::interval;
use super::pooler::{Db, run};
use super::rows::{self, MoveRow, TaskRow};
use super::sql;
use crate::domain::{ClaimToken, ClaimedTask, Error, Result, RuntimeId, Task, TaskId};
use crate::store::{ClaimOutcome, ClaimRequest, StorePolicy, TaskMove};

/// The claim: the preflight's moves and the claimed tasks.
pub(super) async fn claim(
    db: &Db,
    policy: &StorePolicy,
    request: ClaimRequest,
) -> Result<ClaimOutcome> {
    let rows: Vec<TaskRow> = run!(
        db,
        sqlx::query_as(sql::CLAIM)
            .bind(request.runtime_id.as_uuid())
            .bind(i32::try_from(request.max_tasks).unwrap_or(i32::MAX))
            .bind(interval(policy.lease_duration))
            .bind(i64::from(policy.max_lease_expirations))
            .bind(request.budget.map(interval))
            .bind(request.auto_start),
        fetch_all
    )
    .await
    .map_err(|error| classify(error, Context::Runtime(request.runtime_id)))?;
    outcome(rows)
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
