//! The durable operations of leasehold, independent of how they are stored.
//!
//! Every method is one atomic change (or read) with the semantics of spec §2 and §4; the
//! implementations differ only in how they achieve atomicity.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::{
    ClaimToken, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task, TaskId, TaskStatus,
};
use crate::telemetry::metrics::Metrics;

pub mod measured;
pub mod memory;
pub mod postgres;
mod types;

pub use types::*;

#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Gives the store the server's metrics, for what only the store sees (the size of shared
    /// statements). Called once, by the coordinator that takes the store.
    fn attach_metrics(&self, _metrics: &Metrics) {}

    /// Succeeds when the store can serve requests; health reports SERVING only after it does.
    async fn ping(&self) -> Result<()>;

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;

    /// Every key, revoked and expired ones too, oldest first.
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;

    /// Marks the key revoked (a second revocation keeps the first time).
    async fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey>;

    /// The key and its secret's digest, for verifying a presented token.
    async fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>>;

    /// `last_used_at = now` (callers write it at most once a minute).
    async fn note_api_key_used(&self, key_id: Uuid) -> Result<()>;

    /// `None` for an unknown runtime.
    async fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>>;

    /// Upsert by name; the id is stable across re-registrations. Marks the runtime ONLINE.
    /// `token_digest`: the new runtime token's; it replaces (revokes) the previous one.
    async fn register_runtime(
        &self,
        runtime: NewRuntime,
        token_digest: SecretDigest,
    ) -> Result<Runtime>;

    /// Records that the runtime is alive now; an OFFLINE runtime becomes ONLINE.
    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck>;

    /// Signs of life other than heartbeats: `last_seen_at = now` for those of `runtimes` that
    /// are ONLINE (an OFFLINE runtime comes back by a heartbeat or a claim). Returns the ones
    /// written. On PostgreSQL this uses the liveness connections, never the request pool.
    async fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>>;

    /// OFFLINE at once; its unstarted claims go back to QUEUED (T4''). Returns them.
    async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>>;

    /// Fails the runtime's DISPATCHED/RUNNING tasks as RUNTIME_RECOVERY, retrying per policy.
    async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered>;

    /// Sorted by name.
    /// By name: at most `limit`, after the name `after` when given.
    async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Runtime>>;

    /// The preflight requeue of the caller's own expired leases (T4, with the poison guard),
    /// then the claim (T2), as one atomic change.
    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome>;

    /// T4': these claims (pushed on a claim stream that ended) end as lease expiries, each
    /// only while its task is still DISPATCHED under that token. Returns the tasks moved.
    async fn expire_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<Vec<TaskMove>>;

    /// See [`ClaimHorizon`].
    async fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon>;

    /// The runtime's `max_concurrency` and how many DISPATCHED + RUNNING tasks it holds.
    async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity>;

    /// One sweep of the five stages; `None` when another replica holds the sweep.
    /// `due_since`: the previous sweep's `swept_at`, where stage 5 starts looking.
    async fn sweep(
        &self,
        policy: &SweepPolicy,
        oracle: &dyn LivenessOracle,
        due_since: Option<DateTime<Utc>>,
    ) -> Result<Option<SweepReport>>;

    /// Gives up the sweep's leadership, if this replica holds it (at shutdown), so another
    /// replica sweeps at its next tick instead of after the lease runs out.
    async fn step_down(&self) -> Result<()> {
        Ok(())
    }

    // The owner writes below take `acting`: the runtime whose own token made the call (spec
    // §9), or `None` for `admin` and `--auth none`. A write that would change a task another
    // runtime holds is refused with `RuntimeMismatch`, within the same guarded statement; a
    // replay changes nothing and stays allowed.

    async fn start(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Task>;

    /// Renews the lease of a DISPATCHED task to `now + extend_by` (never shortening it).
    async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Duration,
        acting: Option<RuntimeId>,
    ) -> Result<LeaseRenewal>;

    async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task>;

    async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        failure: Failure,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome>;

    async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<Option<RuntimeId>>;

    /// With `acting`, the task must be claimed by or pinned to that runtime.
    async fn task_status(
        &self,
        task_id: TaskId,
        acting: Option<RuntimeId>,
    ) -> Result<(TaskStatus, u32)>;

    async fn enqueue(&self, task: NewTask) -> Result<Enqueued>;

    /// Several enqueues in one atomic change; one result per task, in order. A task pinned to
    /// an unknown runtime gets its own `RuntimeNotFound` and does not stop the others.
    async fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>>;

    async fn get_task(&self, task_id: TaskId) -> Result<Task>;

    /// The task's failed attempts, oldest first.
    async fn task_failures(&self, task_id: TaskId) -> Result<Vec<AttemptFailure>>;

    /// The task's usage counters, summed over its claims, by name.
    async fn task_usage(&self, task_id: TaskId) -> Result<BTreeMap<String, i64>>;

    async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage>;

    /// Active tasks become CANCELLED; a terminal task is returned unchanged.
    async fn cancel(&self, task_id: TaskId) -> Result<Task>;

    /// T9, redrive: a FAILED or CANCELLED task goes back to QUEUED as new (attempt 1, no
    /// lease expirations, no error or result); anything else is `NotRetryable`.
    async fn retry_task(&self, task_id: TaskId) -> Result<Task>;

    /// Ids of the tasks matching `filter` (`queue` set, `statuses` not empty), in id order
    /// after `after`, at most `limit`: the pages a bulk operation works through.
    async fn matching_task_ids(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>>;

    /// [`TaskStore::cancel`] for many tasks in one change: answers the ones it cancelled; the
    /// others (already finished, or gone) are skipped.
    async fn cancel_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>>;

    /// [`TaskStore::retry_task`] for many tasks in one change: answers the ones it redrove;
    /// the others (not FAILED or CANCELLED, or gone) are skipped.
    async fn retry_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>>;

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo>;

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo>;

    /// Active tasks per queue (queues without any are left out), for the depth gauges the
    /// sweeping replica refreshes.
    async fn queue_depths(&self) -> Result<Vec<QueueDepth>>;

    /// The console's queue page: at most `limit` queues, by name (see [`QueueOverview`]).
    async fn queue_overview(&self, limit: u32) -> Result<QueueOverview>;

    /// Tasks finished per queue and minute, for minutes from `since`, by queue then minute.
    async fn throughput(&self, since: DateTime<Utc>) -> Result<Vec<MinuteCount>>;
}
