//! Tasks, runtimes and queues as the service reasons about them.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::ids::{ClaimToken, RuntimeId, TaskId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaskStatus {
    Queued,
    Dispatched,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 6] = [
        TaskStatus::Queued,
        TaskStatus::Dispatched,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The stored (and error-metadata) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "QUEUED",
            TaskStatus::Dispatched => "DISPATCHED",
            TaskStatus::Running => "RUNNING",
            TaskStatus::Completed => "COMPLETED",
            TaskStatus::Failed => "FAILED",
            TaskStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }

    /// DISPATCHED or RUNNING: held by a claim, counted against queue caps and keys.
    pub fn is_active(self) -> bool {
        matches!(self, TaskStatus::Dispatched | TaskStatus::Running)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    TaskError,
    RuntimeOffline,
    RuntimeRecovery,
    DispatchTimeout,
    ExecutionTimeout,
    LeaseExpiredTooOften,
    QueuedExpired,
    RuntimeGone,
    Cancelled,
}

impl FailureReason {
    const ALL: [FailureReason; 9] = [
        FailureReason::TaskError,
        FailureReason::RuntimeOffline,
        FailureReason::RuntimeRecovery,
        FailureReason::DispatchTimeout,
        FailureReason::ExecutionTimeout,
        FailureReason::LeaseExpiredTooOften,
        FailureReason::QueuedExpired,
        FailureReason::RuntimeGone,
        FailureReason::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::TaskError => "TASK_ERROR",
            FailureReason::RuntimeOffline => "RUNTIME_OFFLINE",
            FailureReason::RuntimeRecovery => "RUNTIME_RECOVERY",
            FailureReason::DispatchTimeout => "DISPATCH_TIMEOUT",
            FailureReason::ExecutionTimeout => "EXECUTION_TIMEOUT",
            FailureReason::LeaseExpiredTooOften => "LEASE_EXPIRED_TOO_OFTEN",
            FailureReason::QueuedExpired => "QUEUED_EXPIRED",
            FailureReason::RuntimeGone => "RUNTIME_GONE",
            FailureReason::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.as_str() == text)
    }
}

/// How a claim that no longer holds its task ended, remembered for the task's previous claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimEnd {
    /// Its lease ran out before StartTask (T4, T4').
    LeaseExpired,
    /// Its owner failed the task and the task was retried (T6).
    Retried,
    /// It was taken back for another reason (deregistration T4'', sweeper retry T7).
    Requeued,
}

impl ClaimEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimEnd::LeaseExpired => "LEASE_EXPIRED",
            ClaimEnd::Retried => "RETRIED",
            ClaimEnd::Requeued => "REQUEUED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            ClaimEnd::LeaseExpired,
            ClaimEnd::Retried,
            ClaimEnd::Requeued,
        ]
        .into_iter()
        .find(|end| end.as_str() == text)
    }
}

/// A claim that ended by putting its task back in the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviousClaim {
    pub token: ClaimToken,
    pub end: ClaimEnd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    pub id: TaskId,
    pub queue: String,
    /// Pin: only this runtime may claim the task.
    pub runtime_id: Option<RuntimeId>,
    pub concurrency_key: Option<String>,
    pub priority: i32,
    pub payload: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub status: TaskStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    pub lease_expirations: u32,
    pub claimed_by: Option<RuntimeId>,
    /// The current claim's token; kept after that claim finished the task, so replays of its
    /// CompleteTask/FailTask are recognised. Never leaves the server except in a claim response.
    pub claim_token: Option<ClaimToken>,
    pub previous_claim: Option<PreviousClaim>,
    pub idempotency_key: Option<String>,
    pub execution_timeout: Option<Duration>,
    pub created_at: DateTime<Utc>,
    pub available_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub result: Option<Vec<u8>>,
    pub error: Option<String>,
    pub failure_reason: Option<FailureReason>,
}

/// A task handed to one runtime, with the token that fences its later writes.
#[derive(Clone, Debug, PartialEq)]
pub struct ClaimedTask {
    pub task: Task,
    pub claim_token: ClaimToken,
    pub lease_expires_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeStatus {
    Online,
    Offline,
}

impl RuntimeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeStatus::Online => "ONLINE",
            RuntimeStatus::Offline => "OFFLINE",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ONLINE" => Some(RuntimeStatus::Online),
            "OFFLINE" => Some(RuntimeStatus::Offline),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Runtime {
    pub id: RuntimeId,
    pub name: String,
    pub queues: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub max_concurrency: u32,
    pub status: RuntimeStatus,
    pub last_seen_at: DateTime<Utc>,
    pub registered_at: DateTime<Utc>,
}

/// Number of tasks in each status of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusCounts {
    pub queued: u64,
    pub dispatched: u64,
    pub running: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl StatusCounts {
    pub fn add(&mut self, status: TaskStatus, count: u64) {
        let slot = match status {
            TaskStatus::Queued => &mut self.queued,
            TaskStatus::Dispatched => &mut self.dispatched,
            TaskStatus::Running => &mut self.running,
            TaskStatus::Completed => &mut self.completed,
            TaskStatus::Failed => &mut self.failed,
            TaskStatus::Cancelled => &mut self.cancelled,
        };
        *slot += count;
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueueInfo {
    pub name: String,
    /// 0 = unlimited.
    pub max_concurrent: u32,
    pub paused: bool,
    /// Applied to RUNNING tasks without their own execution timeout.
    pub default_execution_timeout: Option<Duration>,
    pub counts: StatusCounts,
    pub oldest_queued_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
impl Task {
    /// A task held by a random runtime under `token`, its lease a minute from `now`: the
    /// fixture of the domain's unit tests.
    pub(crate) fn held_for_test(
        status: TaskStatus,
        token: Option<ClaimToken>,
        now: DateTime<Utc>,
    ) -> Task {
        Task {
            id: TaskId::new_random(),
            queue: "q".into(),
            runtime_id: None,
            concurrency_key: None,
            priority: 0,
            payload: vec![],
            metadata: BTreeMap::new(),
            status,
            attempt: 1,
            max_attempts: 3,
            lease_expirations: 0,
            claimed_by: Some(RuntimeId::new_random()),
            claim_token: token,
            previous_claim: None,
            idempotency_key: None,
            execution_timeout: None,
            created_at: now,
            available_at: now,
            dispatched_at: Some(now),
            started_at: None,
            finished_at: None,
            lease_expires_at: Some(now + chrono::Duration::seconds(60)),
            result: None,
            error: None,
            failure_reason: None,
        }
    }
}
