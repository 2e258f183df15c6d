//! What the store's operations take and answer.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::auth::{Grant, SecretDigest};
use crate::domain::liveness::RedisView;
use crate::domain::{
    ClaimedTask, FailureReason, QueueInfo, RetryBackoff, RuntimeId, RuntimeStatus, Task, TaskId,
    TaskStatus,
};

/// Policy the store applies inside its transitions.
#[derive(Clone, Copy, Debug)]
pub struct StorePolicy {
    pub lease_duration: Duration,
    /// Poison guard: a task whose lease expires more often than this fails (T10).
    pub max_lease_expirations: u32,
    pub retry_backoff: RetryBackoff,
}

#[derive(Clone, Debug)]
pub struct NewRuntime {
    pub name: String,
    pub queues: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub max_concurrency: u32,
}

/// How a runtime's tokens are known: the current one, and the last few it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeCredential {
    pub current: Option<SecretDigest>,
    pub revoked: Vec<SecretDigest>,
}

#[derive(Clone, Debug)]
pub struct NewApiKey {
    /// Chosen by the caller: it is part of the token text.
    pub id: Uuid,
    pub name: String,
    pub grants: Vec<Grant>,
    pub digest: SecretDigest,
    /// From the store's now; `None` = never expires.
    pub expires_in: Option<Duration>,
}

/// How many replaced runtime tokens are remembered as revoked (older ones read as unknown).
pub const REMEMBERED_REVOKED_TOKENS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub server_time: DateTime<Utc>,
    pub status: RuntimeStatus,
}

#[derive(Clone, Copy, Debug)]
pub struct ClaimRequest {
    pub runtime_id: RuntimeId,
    /// Already capped; 0 runs the preflight and claims nothing.
    pub max_tasks: u32,
    /// Time left before the caller's deadline. The claim is rolled back rather than committed
    /// after it passes, so no task is dispatched to a caller that has given up.
    pub budget: Option<Duration>,
    /// Claimed tasks become RUNNING at once, as if started (StreamClaims' `auto_start`): the
    /// claim is the start, one write fewer per task.
    pub auto_start: bool,
}

#[derive(Clone, Debug)]
pub struct NewTask {
    pub queue: String,
    pub payload: Vec<u8>,
    pub metadata: BTreeMap<String, String>,
    pub priority: i32,
    pub pinned_to: Option<RuntimeId>,
    pub concurrency_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
    pub delay: Duration,
    pub execution_timeout: Option<Duration>,
}

/// What one claim call did.
#[derive(Clone, Debug, Default)]
pub struct ClaimOutcome {
    pub claimed: Vec<ClaimedTask>,
    /// Tasks the preflight moved off this runtime: requeued (T4), or failed by the poison
    /// guard (T10).
    pub preflight: Vec<TaskMove>,
}

/// A task that changed state, as much as the callers need to tell others about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMove {
    pub task_id: TaskId,
    pub queue: String,
    pub pinned_to: Option<RuntimeId>,
    /// The state it moved to.
    pub status: TaskStatus,
    /// When a QUEUED task becomes claimable (later than now for a delay or a retry backoff).
    pub available_at: DateTime<Utc>,
}

impl From<&Task> for TaskMove {
    fn from(task: &Task) -> Self {
        Self {
            task_id: task.id,
            queue: task.queue.clone(),
            pinned_to: task.runtime_id,
            status: task.status,
            available_at: task.available_at,
        }
    }
}

/// How long a runtime's "nothing claimable" verdict can stay true without any write: until
/// one of its own leases expires (its preflight would requeue it) or a delayed task of its
/// queues becomes available. Durations are measured on the store's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimHorizon {
    /// The queues the runtime serves, sorted.
    pub queues: Vec<String>,
    /// Time left on the runtime's earliest-expiring lease; zero when one already passed.
    pub own_lease: Option<Duration>,
    /// Time until the next delayed task of those queues becomes available.
    pub next_available: Option<Duration>,
}

impl ClaimHorizon {
    /// How long a verdict may be trusted, at most `cap`; `None` when not at all.
    pub fn trust_for(&self, cap: Duration) -> Option<Duration> {
        let until = [self.own_lease, self.next_available]
            .into_iter()
            .flatten()
            .fold(cap, Duration::min);
        (!until.is_zero()).then_some(until)
    }
}

/// A runtime's `max_concurrency` (0 = no limit) and what it holds against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_concurrency: u32,
    pub held: u32,
}

impl Capacity {
    /// Free slots; `None` when there is no limit.
    pub fn free(&self) -> Option<u32> {
        (self.max_concurrency > 0).then(|| self.max_concurrency.saturating_sub(self.held))
    }
}

/// Counts of `RecoverOrphans`: every orphan was failed; `retried` of them went back to QUEUED.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    pub moved: Vec<TaskMove>,
}

impl Recovered {
    pub fn failed(&self) -> u32 {
        u32::try_from(self.moved.len()).unwrap_or(u32::MAX)
    }

    pub fn retried(&self) -> u32 {
        let retried = self
            .moved
            .iter()
            .filter(|moved| moved.status == TaskStatus::Queued)
            .count();
        u32::try_from(retried).unwrap_or(u32::MAX)
    }
}

/// The sweeper's thresholds (spec §6).
#[derive(Clone, Copy, Debug)]
pub struct SweepPolicy {
    /// A runtime silent for this long is OFFLINE: `--offline-after` plus the most a sign of
    /// life takes to reach a record (see `Liveness::record_lag`), so none is judged early.
    pub offline_after: Duration,
    /// `--sweep-interval`: a longer gap between sweeps is a blackout, not counted against
    /// runtimes (`domain::liveness::blackout_credit`).
    pub interval: Duration,
    pub dispatch_timeout: Duration,
    pub pinned_orphan_grace: Duration,
    /// Rows per statement; each stage repeats until a batch comes back short.
    pub batch_size: u32,
    /// Finished tasks older than this are deleted; `None` keeps them forever.
    pub retain_finished: Option<Duration>,
}

/// What Redis knows of runtimes' signs of life. The sweeper asks between finding runtimes
/// whose `last_seen_at` is stale and flipping them OFFLINE; without Redis (or when it cannot
/// be asked) the view holds no records and proves nothing by their absence.
#[async_trait]
pub trait LivenessOracle: Send + Sync {
    async fn view(&self, runtimes: &[RuntimeId]) -> RedisView;
}

/// What one sweep did, stage by stage.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// The store's clock when the sweep began; the next sweep's stage 5 starts from here.
    pub swept_at: Option<DateTime<Utc>>,
    /// Stage 1.
    pub marked_offline: Vec<RuntimeId>,
    /// Stage 2: tasks of OFFLINE runtimes, failed as RUNTIME_OFFLINE (retried or FAILED).
    pub runtime_offline: Vec<TaskMove>,
    /// Stage 3: DISPATCH_TIMEOUT and EXECUTION_TIMEOUT.
    pub timed_out: Vec<TaskMove>,
    /// Stage 4: pinned to a runtime gone for longer than the grace (RUNTIME_GONE).
    pub runtime_gone: Vec<TaskMove>,
    /// Stage 5: delayed tasks that became available since the previous sweep.
    pub became_available: Vec<TaskMove>,
    /// Retention: finished tasks deleted (with their usage rows).
    pub deleted_finished: u64,
    /// Stages that failed (logged; the others still ran).
    pub failed_stages: Vec<&'static str>,
}

impl SweepReport {
    /// Every task the sweep moved.
    pub fn moves(&self) -> impl Iterator<Item = &TaskMove> {
        self.runtime_offline
            .iter()
            .chain(&self.timed_out)
            .chain(&self.runtime_gone)
            .chain(&self.became_available)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Enqueued {
    pub task: Task,
    /// The idempotency key matched an existing task, returned unchanged.
    pub deduplicated: bool,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub error: String,
    pub retryable: bool,
    /// Uniform in `[0, 1)`: the full-jitter fraction of the retry backoff. Drawn by the caller
    /// so that stores stay deterministic under test.
    pub jitter: f64,
}

/// A renewed lease and the runtime holding it: the renewal is that runtime's sign of life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRenewal {
    pub lease_expires_at: DateTime<Utc>,
    pub runtime_id: Option<RuntimeId>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FailOutcome {
    pub task: Task,
    pub will_retry: bool,
}

#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    pub queue: Option<String>,
    /// Empty = any status.
    pub statuses: Vec<TaskStatus>,
    /// Tasks pinned to or claimed by this runtime.
    pub runtime_id: Option<RuntimeId>,
    /// Created at or after this (ListTasks only; the bulk operations ignore it).
    pub created_from: Option<DateTime<Utc>>,
    /// Created before this (ListTasks only).
    pub created_before: Option<DateTime<Utc>>,
    /// The task enqueued with this idempotency key (ListTasks only).
    pub idempotency_key: Option<String>,
}

/// Every known queue (a settings row, active tasks at the last sweep, or finished tasks in
/// the tally), for the console: active counts as of the last sweep, finished counts as of the
/// last tally. Never counts the tasks table.
#[derive(Clone, Debug, Default)]
pub struct QueueOverview {
    pub queues: Vec<QueueInfo>,
    /// When the active counts were taken (the latest sweep that wrote them).
    pub counted_at: Option<DateTime<Utc>>,
}

/// One failed attempt of a task: FailTask's or the server's (migration 21).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptFailure {
    pub attempt: u32,
    pub failed_at: DateTime<Utc>,
    pub reason: FailureReason,
    pub error: Option<String>,
}

/// Tasks of one queue finished within one minute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MinuteCount {
    pub queue: String,
    pub minute: DateTime<Utc>,
    pub completed: u64,
    pub failed: u64,
}

/// Where a page of `ListTasks` starts: just after this (created_at, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageCursor {
    pub created_at: DateTime<Utc>,
    pub id: TaskId,
}

#[derive(Clone, Debug)]
pub struct TaskPage {
    pub tasks: Vec<Task>,
    pub next: Option<PageCursor>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct QueueDepth {
    pub queue: String,
    pub queued: u64,
    pub dispatched: u64,
    pub running: u64,
    /// How long the oldest QUEUED task has waited.
    pub oldest_queued_age: Option<Duration>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct QueueUpdate {
    pub max_concurrent: Option<u32>,
    pub paused: Option<bool>,
    /// `Some(None)` clears the queue's execution-time default.
    pub default_execution_timeout: Option<Option<Duration>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(180);

    fn horizon(own_lease: Option<u64>, next_available: Option<u64>) -> ClaimHorizon {
        ClaimHorizon {
            queues: vec!["q".into()],
            own_lease: own_lease.map(Duration::from_secs),
            next_available: next_available.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_verdict_is_trusted_until_the_earliest_of_lease_delay_and_cap() {
        assert_eq!(horizon(None, None).trust_for(CAP), Some(CAP));
        assert_eq!(
            horizon(Some(30), Some(90)).trust_for(CAP),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            horizon(None, Some(5)).trust_for(CAP),
            Some(Duration::from_secs(5))
        );
        assert_eq!(horizon(Some(600), None).trust_for(CAP), Some(CAP));
    }

    #[test]
    fn a_lease_that_already_passed_means_no_verdict() {
        assert_eq!(horizon(Some(0), Some(90)).trust_for(CAP), None);
    }
}
