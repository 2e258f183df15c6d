//! The fencing rules for owner-side writes (spec §4): given a task as it stands and a claim
//! token, decide whether a write applies, is a replay of one that already applied, or is
//! rejected and why.
//!
//! Both stores use this one function. The PostgreSQL store applies the happy path with a
//! guarded UPDATE and only consults it when that UPDATE matched no row, so the SQL guards
//! must equal the `Apply` conditions here; the conformance suite holds them together.

use chrono::{DateTime, Utc};

use super::ids::{ClaimToken, RuntimeId};
use super::task::{ClaimEnd, FailureReason, Task, TaskStatus};

/// The owner-side writes a claim token fences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerWrite {
    Start,
    ExtendLease,
    Complete,
    Fail,
    ReportUsage,
}

/// Why an owner write was refused. Each maps to one gRPC code and ErrorInfo reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not the task's current claim.
    ClaimSuperseded,
    /// `StartTask` on a task already RUNNING under another claim (ALREADY_EXISTS).
    StartedByAnotherClaim,
    /// The token's lease passed, or its claim ended by lease expiry.
    LeaseExpired,
    /// `CompleteTask` before `StartTask`.
    TaskNotStarted,
    /// `ExtendLease` after `StartTask`: a RUNNING task has no lease to extend.
    TaskAlreadyStarted,
    TaskCancelled,
    TaskTerminal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The write may be applied now.
    Apply,
    /// The same write already applied with this token; answer with the current row.
    Replay,
    Refuse(Refusal),
}

/// Judges `write` with `token` against `task` at database time `now`.
///
/// Precedence (spec §4): a replay succeeds; then CANCELLED / terminal; then the token checks.
/// `ReportUsage` replays depend on stored counters, which the caller checks first.
pub fn judge(write: OwnerWrite, task: &Task, token: ClaimToken, now: DateTime<Utc>) -> Verdict {
    let holds_claim = task.claim_token == Some(token);
    if is_replay(write, task, token, holds_claim) {
        return Verdict::Replay;
    }
    match task.status {
        TaskStatus::Cancelled => return Verdict::Refuse(Refusal::TaskCancelled),
        TaskStatus::Completed | TaskStatus::Failed => {
            return Verdict::Refuse(Refusal::TaskTerminal);
        }
        TaskStatus::Queued | TaskStatus::Dispatched | TaskStatus::Running => {}
    }
    if !holds_claim {
        return Verdict::Refuse(refusal_for_stranger(write, task, token));
    }
    match task.status {
        TaskStatus::Dispatched if lease_passed(task, now) => Verdict::Refuse(Refusal::LeaseExpired),
        TaskStatus::Dispatched if write == OwnerWrite::Complete => {
            Verdict::Refuse(Refusal::TaskNotStarted)
        }
        TaskStatus::Running if write == OwnerWrite::ExtendLease => {
            Verdict::Refuse(Refusal::TaskAlreadyStarted)
        }
        TaskStatus::Dispatched | TaskStatus::Running => Verdict::Apply,
        // A requeue always clears the token, so a QUEUED task has no current claim; kept
        // total rather than trusted.
        _ => Verdict::Refuse(Refusal::ClaimSuperseded),
    }
}

fn is_replay(write: OwnerWrite, task: &Task, token: ClaimToken, holds_claim: bool) -> bool {
    match write {
        OwnerWrite::Start => holds_claim && task.status == TaskStatus::Running,
        OwnerWrite::Complete => holds_claim && task.status == TaskStatus::Completed,
        OwnerWrite::Fail => {
            let failed_it = holds_claim
                && task.status == TaskStatus::Failed
                && task.failure_reason == Some(FailureReason::TaskError);
            let retried_it = task.previous_claim.is_some_and(|previous| {
                previous.token == token && previous.end == ClaimEnd::Retried
            });
            failed_it || retried_it
        }
        OwnerWrite::ExtendLease | OwnerWrite::ReportUsage => false,
    }
}

/// The refusal for a token that does not hold the task's current claim.
fn refusal_for_stranger(write: OwnerWrite, task: &Task, token: ClaimToken) -> Refusal {
    if write == OwnerWrite::Start && task.status == TaskStatus::Running {
        return Refusal::StartedByAnotherClaim;
    }
    match task.previous_claim {
        Some(previous) if previous.token == token && previous.end == ClaimEnd::LeaseExpired => {
            Refusal::LeaseExpired
        }
        _ => Refusal::ClaimSuperseded,
    }
}

fn lease_passed(task: &Task, now: DateTime<Utc>) -> bool {
    task.lease_expires_at.is_none_or(|expiry| expiry < now)
}

/// Whether FailTask's original call retried the task, for answering its replay.
pub fn replayed_fail_retried(task: &Task, token: ClaimToken) -> bool {
    task.previous_claim
        .is_some_and(|previous| previous.token == token && previous.end == ClaimEnd::Retried)
}

/// Spec §9: a runtime's own token may change only tasks that runtime holds (its current or
/// last claim), so a leaked claim token is useless to any other runtime. `acting` is `None`
/// for calls not made with a runtime token.
pub fn held_by_another(task: &Task, acting: Option<RuntimeId>) -> bool {
    acting.is_some_and(|runtime| task.claimed_by != Some(runtime))
}

/// For reads about one task (GetTaskStatus): claimed by or pinned to the acting runtime.
pub fn visible_to(
    task_claimed_by: Option<RuntimeId>,
    pinned_to: Option<RuntimeId>,
    acting: Option<RuntimeId>,
) -> bool {
    acting.is_none_or(|runtime| task_claimed_by == Some(runtime) || pinned_to == Some(runtime))
}

#[cfg(test)]
mod tests {

    use chrono::Duration;

    use super::*;

    use crate::domain::task::PreviousClaim;

    fn task(status: TaskStatus, token: Option<ClaimToken>, now: DateTime<Utc>) -> Task {
        Task::held_for_test(status, token, now)
    }

    #[test]
    fn the_current_token_may_start_a_dispatched_task_within_its_lease() {
        let now = Utc::now();
        let token = ClaimToken::new_random();
        let dispatched = task(TaskStatus::Dispatched, Some(token), now);
        assert_eq!(
            judge(OwnerWrite::Start, &dispatched, token, now),
            Verdict::Apply
        );
    }

    #[test]
    fn the_lease_boundary_itself_still_belongs_to_the_owner() {
        let now = Utc::now();
        let token = ClaimToken::new_random();
        let mut dispatched = task(TaskStatus::Dispatched, Some(token), now);
        dispatched.lease_expires_at = Some(now);
        assert_eq!(
            judge(OwnerWrite::Start, &dispatched, token, now),
            Verdict::Apply
        );
        let later = now + Duration::microseconds(1);
        assert_eq!(
            judge(OwnerWrite::Start, &dispatched, token, later),
            Verdict::Refuse(Refusal::LeaseExpired)
        );
    }

    #[test]
    fn a_stale_token_is_superseded_unless_its_lease_expired() {
        let now = Utc::now();
        let stale = ClaimToken::new_random();
        let mut dispatched = task(TaskStatus::Dispatched, Some(ClaimToken::new_random()), now);
        assert_eq!(
            judge(OwnerWrite::Fail, &dispatched, stale, now),
            Verdict::Refuse(Refusal::ClaimSuperseded)
        );
        dispatched.previous_claim = Some(PreviousClaim {
            token: stale,
            end: ClaimEnd::LeaseExpired,
        });
        assert_eq!(
            judge(OwnerWrite::Fail, &dispatched, stale, now),
            Verdict::Refuse(Refusal::LeaseExpired)
        );
    }

    #[test]
    fn starting_a_task_running_under_another_claim_is_already_exists() {
        let now = Utc::now();
        let running = task(TaskStatus::Running, Some(ClaimToken::new_random()), now);
        assert_eq!(
            judge(OwnerWrite::Start, &running, ClaimToken::new_random(), now),
            Verdict::Refuse(Refusal::StartedByAnotherClaim)
        );
    }

    #[test]
    fn replays_win_over_terminal_states() {
        let now = Utc::now();
        let token = ClaimToken::new_random();
        let completed = task(TaskStatus::Completed, Some(token), now);
        assert_eq!(
            judge(OwnerWrite::Complete, &completed, token, now),
            Verdict::Replay
        );
        assert_eq!(
            judge(OwnerWrite::Fail, &completed, token, now),
            Verdict::Refuse(Refusal::TaskTerminal)
        );
    }

    #[test]
    fn a_fail_replay_after_a_retry_succeeds() {
        let now = Utc::now();
        let token = ClaimToken::new_random();
        let mut requeued = task(TaskStatus::Queued, None, now);
        requeued.previous_claim = Some(PreviousClaim {
            token,
            end: ClaimEnd::Retried,
        });
        assert_eq!(
            judge(OwnerWrite::Fail, &requeued, token, now),
            Verdict::Replay
        );
        assert!(replayed_fail_retried(&requeued, token));
        assert_eq!(
            judge(OwnerWrite::Complete, &requeued, token, now),
            Verdict::Refuse(Refusal::ClaimSuperseded)
        );
    }

    #[test]
    fn cancelled_wins_over_token_checks() {
        let now = Utc::now();
        let cancelled = task(TaskStatus::Cancelled, Some(ClaimToken::new_random()), now);
        assert_eq!(
            judge(
                OwnerWrite::Complete,
                &cancelled,
                ClaimToken::new_random(),
                now
            ),
            Verdict::Refuse(Refusal::TaskCancelled)
        );
    }

    #[test]
    fn complete_before_start_is_not_started_and_extend_after_start_is_refused() {
        let now = Utc::now();
        let token = ClaimToken::new_random();
        let dispatched = task(TaskStatus::Dispatched, Some(token), now);
        assert_eq!(
            judge(OwnerWrite::Complete, &dispatched, token, now),
            Verdict::Refuse(Refusal::TaskNotStarted)
        );
        let running = task(TaskStatus::Running, Some(token), now);
        assert_eq!(
            judge(OwnerWrite::ExtendLease, &running, token, now),
            Verdict::Refuse(Refusal::TaskAlreadyStarted)
        );
    }
}
