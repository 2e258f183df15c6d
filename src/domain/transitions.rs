//! The transitions of spec §2 that one task decides alone, as pure functions: each sets the
//! fields its transition changes and answers the status it leads to, leaving `task.status`
//! for the caller to move (the embedded store keeps indexes by status). The PostgreSQL store
//! writes the same fields in its statements (`store/postgres/sql`); the differential tests
//! hold the two to the same answers.
//!
//! Times are kept at PostgreSQL's microsecond precision, so both stores answer equal values.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{ClaimEnd, FailureReason, PreviousClaim, RetryBackoff, Task, TaskStatus, retry};

/// `at`, at PostgreSQL's microsecond precision.
pub fn at_store_precision(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// `at + delay`, at the store's precision (a delay too large to add saturates).
pub fn after(at: DateTime<Utc>, delay: Duration) -> DateTime<Utc> {
    let delay = chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX);
    at_store_precision(
        at.checked_add_signed(delay)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    )
}

/// Ends the current claim as `end`, remembering its token so a late write with it is judged
/// (`domain::fence`).
fn end_claim(task: &mut Task, end: ClaimEnd) {
    task.previous_claim = task
        .claim_token
        .take()
        .map(|token| PreviousClaim { token, end });
    task.lease_expires_at = None;
}

/// T4: a DISPATCHED task's lease ran out before StartTask. Back to QUEUED, or FAILED as
/// LEASE_EXPIRED_TOO_OFTEN once its leases expired more than `max_lease_expirations` times
/// (T10, the poison guard).
pub fn expire_lease(task: &mut Task, max_lease_expirations: u32, now: DateTime<Utc>) -> TaskStatus {
    task.lease_expirations += 1;
    end_claim(task, ClaimEnd::LeaseExpired);
    if task.lease_expirations <= max_lease_expirations {
        return TaskStatus::Queued;
    }
    task.failure_reason = Some(FailureReason::LeaseExpiredTooOften);
    task.error = Some(format!("lease expired {} times", task.lease_expirations));
    task.finished_at = Some(now);
    TaskStatus::Failed
}

/// T4': a claim stream ended before its claim was started; the claim goes back at once. Not
/// a lease expiry for the poison guard: the task never ran, and a flapping client must not
/// fail a queue's tasks.
pub fn give_back(task: &mut Task) -> TaskStatus {
    end_claim(task, ClaimEnd::LeaseExpired);
    TaskStatus::Queued
}

/// Why a held task fails: the worker's own failure (T6) or the server's (T7: offline runtime,
/// timeouts, recovery), which is always retryable.
#[derive(Clone, Debug)]
pub struct FailureCause {
    pub reason: FailureReason,
    pub error: String,
    pub retryable: bool,
    /// How the claim ends when the task is retried: `Retried` for the worker's failure,
    /// `Requeued` for the server's.
    pub retried_claim_ends_as: ClaimEnd,
}

/// T6/T7: the task fails. While it is retryable and attempts remain it goes back to QUEUED
/// with the next attempt after the backoff (`jitter` in [0, 1)); otherwise it is FAILED for
/// good, and its claim token stays on the row (any write with it gets TASK_TERMINAL).
pub fn fail(
    task: &mut Task,
    cause: FailureCause,
    backoff: &RetryBackoff,
    jitter: f64,
    now: DateTime<Utc>,
) -> TaskStatus {
    let retrying = retry::will_retry(cause.retryable, task.attempt, task.max_attempts);
    task.error = Some(cause.error);
    task.failure_reason = Some(cause.reason);
    task.lease_expires_at = None;
    if !retrying {
        task.finished_at = Some(now);
        return TaskStatus::Failed;
    }
    task.available_at = after(now, backoff.delay(task.attempt, jitter));
    task.attempt += 1;
    end_claim(task, cause.retried_claim_ends_as);
    TaskStatus::Queued
}

/// CancelTask: an active task becomes CANCELLED; a finished one is left as it is (`None`).
pub fn cancel(task: &mut Task, now: DateTime<Utc>) -> Option<TaskStatus> {
    if task.status.is_terminal() {
        return None;
    }
    task.finished_at = Some(now);
    task.failure_reason = Some(FailureReason::Cancelled);
    task.lease_expires_at = None;
    Some(TaskStatus::Cancelled)
}

/// T9, RetryTask: a FAILED or CANCELLED task starts over as a new task would (attempt 1, no
/// lease expirations), available now. The finishing claim's token, kept on the row, is
/// remembered as ended by requeue, so its late writes get CLAIM_SUPERSEDED. Any other status:
/// `Err` with it (TASK_NOT_RETRYABLE).
pub fn redrive(task: &mut Task, now: DateTime<Utc>) -> Result<TaskStatus, TaskStatus> {
    if !matches!(task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
        return Err(task.status);
    }
    // A task cancelled while queued holds no claim: its earlier claim's end stays known.
    if task.claim_token.is_some() {
        end_claim(task, ClaimEnd::Requeued);
    }
    task.attempt = 1;
    task.lease_expirations = 0;
    task.available_at = now;
    task.dispatched_at = None;
    task.started_at = None;
    task.finished_at = None;
    task.lease_expires_at = None;
    task.result = None;
    task.error = None;
    task.failure_reason = None;
    Ok(TaskStatus::Queued)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::domain::ClaimToken;

    const BACKOFF: RetryBackoff = RetryBackoff {
        base: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    fn held(status: TaskStatus, now: DateTime<Utc>) -> Task {
        Task {
            max_attempts: 2,
            ..Task::held_for_test(status, Some(ClaimToken::new_random()), now)
        }
    }

    fn worker_failure(retryable: bool) -> FailureCause {
        FailureCause {
            reason: FailureReason::TaskError,
            error: "boom".into(),
            retryable,
            retried_claim_ends_as: ClaimEnd::Retried,
        }
    }

    #[test]
    fn an_expired_lease_requeues_until_the_poison_guard_fails_the_task() {
        let now = Utc::now();
        let mut task = held(TaskStatus::Dispatched, now);
        let token = task.claim_token.unwrap();
        assert_eq!(expire_lease(&mut task, 1, now), TaskStatus::Queued);
        assert_eq!(
            task.previous_claim,
            Some(PreviousClaim {
                token,
                end: ClaimEnd::LeaseExpired
            })
        );
        assert_eq!((task.claim_token, task.lease_expires_at), (None, None));
        task.claim_token = Some(ClaimToken::new_random());
        assert_eq!(expire_lease(&mut task, 1, now), TaskStatus::Failed);
        assert_eq!(
            task.failure_reason,
            Some(FailureReason::LeaseExpiredTooOften)
        );
        assert_eq!(task.finished_at, Some(now));
    }

    #[test]
    fn a_failure_retries_while_attempts_remain_then_fails_for_good() {
        let now = at_store_precision(Utc::now());
        let mut task = held(TaskStatus::Running, now);
        assert_eq!(
            fail(&mut task, worker_failure(true), &BACKOFF, 0.5, now),
            TaskStatus::Queued
        );
        assert_eq!(task.attempt, 2);
        assert_eq!(task.available_at, now + chrono::Duration::milliseconds(500));
        assert_eq!(
            task.previous_claim.map(|claim| claim.end),
            Some(ClaimEnd::Retried)
        );
        task.claim_token = Some(ClaimToken::new_random());
        let last_token = task.claim_token;
        assert_eq!(
            fail(&mut task, worker_failure(true), &BACKOFF, 0.5, now),
            TaskStatus::Failed
        );
        // The finishing claim's token stays on the row: its writes get TASK_TERMINAL.
        assert_eq!(task.claim_token, last_token);
        assert_eq!(task.error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_non_retryable_failure_fails_at_once() {
        let now = Utc::now();
        let mut task = held(TaskStatus::Running, now);
        assert_eq!(
            fail(&mut task, worker_failure(false), &BACKOFF, 0.5, now),
            TaskStatus::Failed
        );
        assert_eq!(task.attempt, 1);
    }

    #[test]
    fn cancel_leaves_a_finished_task_alone() {
        let now = Utc::now();
        let mut task = held(TaskStatus::Completed, now);
        assert_eq!(cancel(&mut task, now), None);
        let mut task = held(TaskStatus::Running, now);
        assert_eq!(cancel(&mut task, now), Some(TaskStatus::Cancelled));
        assert_eq!(task.failure_reason, Some(FailureReason::Cancelled));
    }

    #[test]
    fn redrive_starts_over_and_remembers_the_claim_it_ends() {
        let now = Utc::now();
        let mut task = held(TaskStatus::Running, now);
        assert_eq!(redrive(&mut task, now), Err(TaskStatus::Running));
        let mut task = held(TaskStatus::Failed, now);
        task.attempt = 2;
        let token = task.claim_token.unwrap();
        assert_eq!(redrive(&mut task, now), Ok(TaskStatus::Queued));
        assert_eq!(task.attempt, 1);
        assert_eq!(
            task.previous_claim,
            Some(PreviousClaim {
                token,
                end: ClaimEnd::Requeued
            })
        );
        // Cancelled while queued: no claim to end, the earlier one's end stays known.
        let mut task = held(TaskStatus::Cancelled, now);
        let earlier = PreviousClaim {
            token,
            end: ClaimEnd::LeaseExpired,
        };
        task.claim_token = None;
        task.previous_claim = Some(earlier);
        assert_eq!(redrive(&mut task, now), Ok(TaskStatus::Queued));
        assert_eq!(task.previous_claim, Some(earlier));
    }
}
