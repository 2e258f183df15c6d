//! The service layer: every RPC's rules that depend on configuration (batch caps, lease
//! clamps, size limits, defaults), in front of the store. The one place that combines the
//! store with liveness, the empty-claim cache and wake-ups: after every change that commits,
//! the topics it touched are announced ([`Coordinator::announce`]): their cache versions are
//! bumped, then waiters here and on other replicas are woken.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::advisory::{Cancellation, ClaimCache, Liveness, RedisLink, WakeRelay};
use crate::auth::{AuthMode, Authenticator};
use crate::domain::auth::{ApiKey, Grant, Principal, Secret, TokenText};
use crate::domain::{
    ClaimToken, ClaimedTask, Error, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task,
    TaskId, TaskStatus, validate,
};
use crate::signs_of_life::SignsOfLife;
use crate::store::measured::MeasuredStore;
use crate::store::{
    AttemptFailure, Capacity, ClaimRequest, Enqueued, FailOutcome, Failure, HeartbeatAck,
    MinuteCount, NewApiKey, NewRuntime, NewTask, PageCursor, QueueOverview, QueueUpdate, Recovered,
    SweepPolicy, SweepReport, TaskFilter, TaskMove, TaskPage, TaskStore,
};
use crate::telemetry::metrics::Metrics;
use crate::wakeups::{DueWakeups, Notifier, Subscription, Topic, Wakes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most tasks one ClaimTask call hands out.
mod announce;
mod bulk;
mod claim;
mod runtimes;

pub use bulk::{BULK_BATCH, BulkOutcome};

/// Most tasks one ClaimTask call hands out.
pub const MAX_CLAIM_BATCH: u32 = 32;
/// `max_attempts` when the producer leaves it at 0.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most tasks one EnqueueTasks call may carry.
pub const MAX_ENQUEUE_BATCH: usize = 1000;
/// Longest a ClaimTask waits for work (`wait`).
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// A long-polling claim gives up this long before the caller's deadline, so its empty answer
/// arrives in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);
/// Most counters one ReportUsage call may carry.
pub const MAX_USAGE_COUNTERS: usize = 256;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub lease_duration: Duration,
    pub heartbeat_interval: Duration,
    /// Limit for payloads, results and error texts alike.
    pub max_payload_bytes: usize,
    pub liveness_ttl: Duration,
    pub sweep: SweepPolicy,
    /// How often an idle claim stream hears a keepalive.
    pub stream_keepalive: Duration,
    /// The fallback re-check of waiting claims (streams and long-polls) when no wake-up came.
    pub stream_poll_interval: Duration,
    /// See `--stream-claim-linger`.
    pub stream_claim_linger: Duration,
    /// See `--max-streams-per-runtime`.
    pub max_streams_per_runtime: usize,
}

/// What a runtime learns when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub runtime: Runtime,
    /// Shown once, in the registration's response.
    pub runtime_token: TokenText,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
}

pub struct Coordinator {
    store: Arc<dyn TaskStore>,
    settings: Settings,
    redis: Option<Arc<RedisLink>>,
    liveness: Liveness,
    /// Runtimes heard from since the last recording (see [`SignsOfLife`]).
    signs_of_life: SignsOfLife,
    claim_cache: Arc<ClaimCache>,
    notifier: Arc<Notifier>,
    due: DueWakeups,
    relay: WakeRelay,
    /// Queues whose depth gauges this replica has set.
    gauged_queues: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Cancelled when the server starts draining: claim streams say `draining` and end.
    draining: CancellationToken,
    authenticator: Authenticator,
    /// Claim streams open on this replica, per runtime.
    open_streams: Arc<std::sync::Mutex<std::collections::HashMap<RuntimeId, usize>>>,
    metrics: Metrics,
}

/// One open claim stream of a runtime, counted until dropped.
pub struct StreamSlot {
    runtime: RuntimeId,
    open_streams: Arc<std::sync::Mutex<std::collections::HashMap<RuntimeId, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.runtime) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.runtime);
            }
        }
    }
}

impl Coordinator {
    /// `redis`: the advisory link, when configured.
    pub fn new(
        store: Arc<dyn TaskStore>,
        settings: Settings,
        redis: Option<Arc<RedisLink>>,
        auth: (AuthMode, Option<PathBuf>),
        metrics: Metrics,
    ) -> Self {
        store.attach_metrics(&metrics);
        let store: Arc<dyn TaskStore> = Arc::new(MeasuredStore::new(store, metrics.clone()));
        Self {
            authenticator: Authenticator::new(auth.0, store.clone(), redis.clone(), auth.1),
            open_streams: Arc::default(),
            liveness: Liveness::new(
                redis.clone(),
                settings.liveness_ttl,
                settings.sweep.offline_after,
            ),
            signs_of_life: SignsOfLife::new(metrics.clone()),
            claim_cache: Arc::new(ClaimCache::new(redis.clone())),
            notifier: Notifier::new(),
            due: DueWakeups::default(),
            gauged_queues: std::sync::Mutex::default(),
            relay: WakeRelay::default(),
            draining: CancellationToken::new(),
            redis,
            store,
            settings,
            metrics,
        }
    }

    /// How calls are authenticated (`--auth`).
    pub fn auth_mode(&self) -> AuthMode {
        self.authenticator.mode()
    }

    /// This server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn redis(&self) -> Option<&Arc<RedisLink>> {
        self.redis.as_ref()
    }

    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await
    }

    /// Cancelled when the server begins draining.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Gives up the sweep's leadership at shutdown (a failure only delays the next leader
    /// until the lease runs out).
    pub async fn step_down(&self) {
        if let Err(error) = self.store.step_down().await {
            tracing::warn!(%error, "could not give up the sweep's leadership");
        }
    }

    /// `acting` on every owner write: the runtime whose own token made the call (spec §9).
    pub async fn start(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        let task = self.store.start(task_id, token, acting).await?;
        self.note_holder_alive(&task);
        self.metrics.tasks_started(1);
        Ok(task)
    }

    /// `extend_by`: absent or zero = the lease duration, which is also its maximum.
    pub async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Option<Duration>,
        acting: Option<RuntimeId>,
    ) -> Result<DateTime<Utc>> {
        let lease = self.settings.lease_duration;
        let extend_by = extend_by
            .filter(|extend_by| !extend_by.is_zero())
            .map_or(lease, |extend_by| extend_by.min(lease));
        let renewal = self
            .store
            .extend_lease(task_id, token, extend_by, acting)
            .await?;
        if let Some(runtime_id) = renewal.runtime_id {
            self.note_sign_of_life(runtime_id);
        }
        Ok(renewal.lease_expires_at)
    }

    /// A token-fenced write succeeded: the runtime holding the task made it.
    fn note_holder_alive(&self, task: &Task) {
        if let Some(runtime_id) = task.claimed_by {
            self.note_sign_of_life(runtime_id);
        }
    }

    pub async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        validate::payload_size("result", &result, self.settings.max_payload_bytes)?;
        let task = self.store.complete(task_id, token, result, acting).await?;
        self.note_holder_alive(&task);
        self.metrics.task_completed();
        self.announce_task(&task).await;
        Ok(task)
    }

    pub async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        error: String,
        retryable: bool,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome> {
        // Never refused for its content: a refusal would strand the task RUNNING (spec §10).
        let failure = Failure {
            error: validate::failure_text(&error, self.settings.max_payload_bytes),
            retryable,
            jitter: rand::random::<f64>(),
        };
        let outcome = self.store.fail(task_id, token, failure, acting).await?;
        self.note_holder_alive(&outcome.task);
        self.metrics.task_failed("TASK_ERROR", outcome.will_retry);
        self.announce_task(&outcome.task).await;
        Ok(outcome)
    }

    pub async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<()> {
        if counters.len() > MAX_USAGE_COUNTERS {
            return Err(Error::invalid(
                "counters",
                format!("at most {MAX_USAGE_COUNTERS} counters per report"),
            ));
        }
        for name in counters.keys() {
            validate::required_text("counters", name)?;
        }
        if let Some(runtime_id) = self
            .store
            .report_usage(task_id, token, counters, acting)
            .await?
        {
            self.note_sign_of_life(runtime_id);
        }
        Ok(())
    }

    pub async fn task_status(
        &self,
        task_id: TaskId,
        acting: Option<RuntimeId>,
    ) -> Result<(TaskStatus, u32)> {
        self.store.task_status(task_id, acting).await
    }

    /// Validates a task to enqueue and fills its defaults.
    fn prepare(&self, mut task: NewTask) -> Result<NewTask> {
        validate::queue_name("queue", &task.queue)?;
        validate::payload_size("payload", &task.payload, self.settings.max_payload_bytes)?;
        validate::string_map("metadata", &task.metadata)?;
        validate::duration("delay", task.delay)?;
        if let Some(timeout) = task.execution_timeout {
            validate::duration("execution_timeout", timeout)?;
        }
        if task.max_attempts == 0 {
            task.max_attempts = DEFAULT_MAX_ATTEMPTS;
        }
        Ok(task)
    }

    pub async fn enqueue(&self, task: NewTask) -> Result<Enqueued> {
        let task = self.prepare(task)?;
        let enqueued = self.store.enqueue(task).await?;
        if !enqueued.deduplicated {
            self.announce_task(&enqueued.task).await;
        }
        tracing::debug!(task_id = %enqueued.task.id, deduplicated = enqueued.deduplicated, "enqueued");
        Ok(enqueued)
    }

    /// EnqueueTasks: the valid items are stored in one atomic change; every item gets its own
    /// result, in order (an item that failed to parse arrives as its error).
    pub async fn enqueue_batch(
        &self,
        items: Vec<Result<NewTask>>,
    ) -> Result<Vec<Result<Enqueued>>> {
        if items.len() > MAX_ENQUEUE_BATCH {
            return Err(Error::invalid(
                "requests",
                format!("at most {MAX_ENQUEUE_BATCH} tasks per call"),
            ));
        }
        let mut results: Vec<Option<Result<Enqueued>>> = Vec::with_capacity(items.len());
        let mut valid = Vec::new();
        for item in items {
            match item.and_then(|task| self.prepare(task)) {
                Ok(task) => {
                    valid.push(task);
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let mut stored = self.store.enqueue_batch(valid).await?.into_iter();
        let results: Vec<Result<Enqueued>> = results
            .into_iter()
            .map(|result| {
                result.or_else(|| stored.next()).unwrap_or_else(|| {
                    Err(Error::Internal(
                        "the store answered fewer results than tasks".into(),
                    ))
                })
            })
            .collect();
        let fresh: Vec<TaskMove> = results
            .iter()
            .filter_map(|result| result.as_ref().ok())
            .filter(|enqueued| !enqueued.deduplicated)
            .map(|enqueued| TaskMove::from(&enqueued.task))
            .collect();
        self.announce(&fresh).await;
        Ok(results)
    }

    pub async fn get_task(&self, task_id: TaskId) -> Result<Task> {
        self.store.get_task(task_id).await
    }

    /// `page_size`: 0 = the default; above the maximum it is capped.
    pub async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage> {
        if let Some(queue) = &filter.queue {
            validate::queue_name("queue", queue)?;
        }
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        self.store.list_tasks(filter, after, page_size).await
    }

    /// A cancelled task that was held (it still carries its claim's token) is pushed as
    /// `cancelled` to its runtime's claim streams.
    pub async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        let task = self.store.cancel(task_id).await?;
        let cancellation = match (task.status, task.claim_token, task.claimed_by) {
            (TaskStatus::Cancelled, Some(_), Some(runtime)) => Some(Cancellation {
                runtime,
                task: task.id,
            }),
            _ => None,
        };
        let wakes = Wakes::of_moves([&TaskMove::from(&task)]);
        self.announce_topics(wakes, cancellation.as_slice()).await;
        Ok(task)
    }

    /// Redrive (T9).
    pub async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        let task = self.store.retry_task(task_id).await?;
        self.announce_task(&task).await;
        tracing::info!(%task_id, "task redriven");
        Ok(task)
    }

    /// The task's failed attempts, oldest first.
    pub async fn task_failures(&self, task_id: TaskId) -> Result<Vec<AttemptFailure>> {
        self.store.task_failures(task_id).await
    }

    pub async fn task_usage(&self, task_id: TaskId) -> Result<BTreeMap<String, i64>> {
        self.store.task_usage(task_id).await
    }

    /// The console's queue page (see [`QueueOverview`]).
    pub async fn queue_overview(&self, limit: u32) -> Result<QueueOverview> {
        self.store.queue_overview(limit).await
    }

    /// Tasks finished per queue and minute since `since`.
    pub async fn throughput(&self, since: DateTime<Utc>) -> Result<Vec<MinuteCount>> {
        self.store.throughput(since).await
    }

    pub async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        self.store.describe_queue(queue).await
    }

    pub async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        if let Some(Some(timeout)) = update.default_execution_timeout {
            validate::duration("default_execution_timeout", timeout)?;
        }
        let info = self.store.update_queue(queue, update).await?;
        // Its cap or pause changed: any waiter may be able to claim now.
        self.announce_topics(Wakes::all([Topic::Queue(queue.to_owned())]), &[])
            .await;
        Ok(info)
    }
}

/// What a claim makes of its tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimedAs {
    /// DISPATCHED under a lease; the worker starts each with StartTask.
    Dispatched,
    /// RUNNING at once (StreamClaims' `auto_start`): the claim is the start.
    Started,
}

/// Whether a claim may be answered from the empty-claim cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// A poll: a verdict still valid answers it without PostgreSQL.
    Read,
    /// After a wake-up: something changed, so ask PostgreSQL at once (the versions that say
    /// so may not have reached Redis, if it was out of reach). Stores no verdict.
    Bypass,
}

/// `interval` ± 20%, so waiters that started together do not re-check together.
pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}
