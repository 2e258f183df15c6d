//! The service layer: every RPC's rules that depend on configuration (batch caps, lease
//! clamps, size limits, defaults), in front of the store. The one place that will combine the
//! store with liveness, the empty-claim cache and wake-ups.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::{
    ClaimToken, ClaimedTask, Error, QueueInfo, Result, Runtime, RuntimeId, Task, TaskId,
    TaskStatus, validate,
};
use crate::store::{
    ClaimRequest, Enqueued, FailOutcome, Failure, HeartbeatAck, NewRuntime, NewTask, PageCursor,
    QueueUpdate, TaskFilter, TaskPage, TaskStore,
};

/// Most tasks one ClaimTask call hands out.
pub const MAX_CLAIM_BATCH: u32 = 32;
/// `max_attempts` when the producer leaves it at 0.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most counters one ReportUsage call may carry.
pub const MAX_USAGE_COUNTERS: usize = 256;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub lease_duration: Duration,
    pub heartbeat_interval: Duration,
    /// Limit for payloads, results and error texts alike.
    pub max_payload_bytes: usize,
}

/// What a runtime learns when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub runtime: Runtime,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
}

pub struct Coordinator {
    store: Arc<dyn TaskStore>,
    settings: Settings,
}

impl Coordinator {
    pub fn new(store: Arc<dyn TaskStore>, settings: Settings) -> Self {
        Self { store, settings }
    }

    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await
    }

    pub async fn register_runtime(&self, mut runtime: NewRuntime) -> Result<Registration> {
        validate::required_text("name", &runtime.name)?;
        if runtime.queues.is_empty() {
            return Err(Error::invalid(
                "queues",
                "a runtime serves at least one queue",
            ));
        }
        for queue in &runtime.queues {
            validate::queue_name("queues", queue)?;
        }
        runtime.queues.sort();
        runtime.queues.dedup();
        let runtime = self.store.register_runtime(runtime).await?;
        tracing::info!(runtime_id = %runtime.id, name = %runtime.name, "runtime registered");
        Ok(Registration {
            runtime,
            heartbeat_interval: self.settings.heartbeat_interval,
            lease_duration: self.settings.lease_duration,
        })
    }

    pub async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        self.store.heartbeat(runtime_id).await
    }

    /// Preflight requeue and claim. `max_tasks`: absent = 1, 0 = only the preflight, capped at
    /// [`MAX_CLAIM_BATCH`]. `budget` is the time left before the caller's deadline.
    pub async fn claim(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        budget: Option<Duration>,
    ) -> Result<Vec<ClaimedTask>> {
        let max_tasks = max_tasks.unwrap_or(1).min(MAX_CLAIM_BATCH);
        self.store
            .claim(ClaimRequest {
                runtime_id,
                max_tasks,
                budget,
            })
            .await
    }

    pub async fn start(&self, task_id: TaskId, token: ClaimToken) -> Result<Task> {
        self.store.start(task_id, token).await
    }

    /// `extend_by`: absent or zero = the lease duration, which is also its maximum.
    pub async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Option<Duration>,
    ) -> Result<DateTime<Utc>> {
        let lease = self.settings.lease_duration;
        let extend_by = extend_by
            .filter(|extend_by| !extend_by.is_zero())
            .map_or(lease, |extend_by| extend_by.min(lease));
        self.store.extend_lease(task_id, token, extend_by).await
    }

    pub async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
    ) -> Result<Task> {
        validate::payload_size("result", &result, self.settings.max_payload_bytes)?;
        self.store.complete(task_id, token, result).await
    }

    pub async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        error: String,
        retryable: bool,
    ) -> Result<FailOutcome> {
        validate::payload_size("error", error.as_bytes(), self.settings.max_payload_bytes)?;
        let failure = Failure {
            error,
            retryable,
            jitter: rand::random::<f64>(),
        };
        self.store.fail(task_id, token, failure).await
    }

    pub async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
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
        self.store.report_usage(task_id, token, counters).await
    }

    pub async fn task_status(&self, task_id: TaskId) -> Result<(TaskStatus, u32)> {
        self.store.task_status(task_id).await
    }

    pub async fn enqueue(&self, mut task: NewTask) -> Result<Enqueued> {
        validate::queue_name("queue", &task.queue)?;
        validate::payload_size("payload", &task.payload, self.settings.max_payload_bytes)?;
        if task.max_attempts == 0 {
            task.max_attempts = DEFAULT_MAX_ATTEMPTS;
        }
        let enqueued = self.store.enqueue(task).await?;
        tracing::debug!(task_id = %enqueued.task.id, deduplicated = enqueued.deduplicated, "enqueued");
        Ok(enqueued)
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

    pub async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        self.store.cancel(task_id).await
    }

    pub async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        self.store.describe_queue(queue).await
    }

    pub async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        self.store.update_queue(queue, update).await
    }
}
