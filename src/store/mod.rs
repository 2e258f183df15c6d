//! The durable operations of leasehold, independent of how they are stored.
//!
//! Every method is one atomic change (or read) with the semantics of spec §2 and §4; the
//! implementations differ only in how they achieve atomicity.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::{
    ClaimToken, ClaimedTask, QueueInfo, Result, RetryBackoff, Runtime, RuntimeId, RuntimeStatus,
    Task, TaskId, TaskStatus,
};

pub mod memory;
pub mod postgres;

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

#[derive(Clone, Copy, Debug, Default)]
pub struct QueueUpdate {
    pub max_concurrent: Option<u32>,
    pub paused: Option<bool>,
}

#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Succeeds when the store can serve requests; health reports SERVING only after it does.
    async fn ping(&self) -> Result<()>;

    /// Upsert by name; the id is stable across re-registrations. Marks the runtime ONLINE.
    async fn register_runtime(&self, runtime: NewRuntime) -> Result<Runtime>;

    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck>;

    /// The preflight requeue of the caller's own expired leases (T4, with the poison guard),
    /// then the claim (T2), as one atomic change.
    async fn claim(&self, request: ClaimRequest) -> Result<Vec<ClaimedTask>>;

    async fn start(&self, task_id: TaskId, token: ClaimToken) -> Result<Task>;

    /// Renews the lease of a DISPATCHED task to `now + extend_by` (never shortening it).
    async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Duration,
    ) -> Result<DateTime<Utc>>;

    async fn complete(&self, task_id: TaskId, token: ClaimToken, result: Vec<u8>) -> Result<Task>;

    async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        failure: Failure,
    ) -> Result<FailOutcome>;

    async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
    ) -> Result<()>;

    async fn task_status(&self, task_id: TaskId) -> Result<(TaskStatus, u32)>;

    async fn enqueue(&self, task: NewTask) -> Result<Enqueued>;

    async fn get_task(&self, task_id: TaskId) -> Result<Task>;

    async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage>;

    /// Active tasks become CANCELLED; a terminal task is returned unchanged.
    async fn cancel(&self, task_id: TaskId) -> Result<Task>;

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo>;

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo>;
}
