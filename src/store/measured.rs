//! A store that times every call of the store it wraps
//! (`leasehold_store_call_duration_seconds{operation, outcome}`), and tries a call again when
//! it lost to a concurrent change (a serialization failure or a deadlock: nothing of it was
//! committed, so running it again is safe), before answering `STORE_CONFLICT` (spec §10).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{
    AttemptFailure, Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome,
    Failure, HeartbeatAck, LeaseRenewal, LivenessOracle, MinuteCount, NewApiKey, NewRuntime,
    NewTask, PageCursor, QueueDepth, QueueOverview, QueueUpdate, Recovered, RuntimeCredential,
    SweepPolicy, SweepReport, TaskFilter, TaskMove, TaskPage, TaskStore,
};
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::{
    ClaimToken, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task, TaskId, TaskStatus,
};
use crate::telemetry::metrics::Metrics;

pub struct MeasuredStore {
    inner: Arc<dyn TaskStore>,
    metrics: Metrics,
}

impl MeasuredStore {
    pub fn new(inner: Arc<dyn TaskStore>, metrics: Metrics) -> Self {
        Self { inner, metrics }
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &Result<T>) {
        self.metrics
            .store_call(operation, result.is_ok(), started.elapsed());
    }
}

/// Attempts after the first when a call lost to a concurrent change.
const CONFLICT_RETRIES: u32 = 3;

fn lost_to_a_conflict<T>(result: &Result<T>) -> bool {
    matches!(result, Err(crate::domain::Error::StoreConflict(_)))
}

/// A short, growing, jittered pause, so two conflicting calls do not collide again.
fn conflict_pause(attempt: u32) -> Duration {
    Duration::from_millis(u64::from(attempt) * 5).mul_f64(0.5 + rand::random::<f64>())
}

/// Each method forwards to the wrapped store and records how long it took. `retried` methods
/// (the multi-row changes, which can deadlock with one another, and whose arguments are cheap
/// to copy) run again after a conflict; `once` methods (reads, single-row writes, and the calls
/// that carry payloads, which are not worth copying on every call) answer STORE_CONFLICT for
/// the client to retry.
macro_rules! measured {
    ($( $mode:ident fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        #[async_trait]
        impl TaskStore for MeasuredStore {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    let started = Instant::now();
                    let result = measured!(@call $mode self $name $($arg)*);
                    self.record(stringify!($name), started, &result);
                    result
                }
            )*
        }
    };
    (@call once $store:ident $name:ident $($arg:ident)*) => {
        $store.inner.$name($($arg),*).await
    };
    (@call retried $store:ident $name:ident $($arg:ident)*) => {{
        let mut attempt = 0;
        loop {
            #[allow(clippy::clone_on_copy)]
            let result = $store.inner.$name($(Clone::clone(&$arg)),*).await;
            if attempt < CONFLICT_RETRIES && lost_to_a_conflict(&result) {
                attempt += 1;
                $store.metrics.store_conflict_retried();
                tokio::time::sleep(conflict_pause(attempt)).await;
                continue;
            }
            break result;
        }
    }};
}

measured! {
    once fn ping(&self) -> Result<()>;
    once fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;
    once fn list_api_keys(&self) -> Result<Vec<ApiKey>>;
    once fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey>;
    once fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>>;
    once fn note_api_key_used(&self, key_id: Uuid) -> Result<()>;
    once fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>>;
    once fn register_runtime(&self, runtime: NewRuntime, token_digest: SecretDigest) -> Result<Runtime>;
    retried fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck>;
    retried fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>>;
    retried fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>>;
    retried fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered>;
    once fn list_runtimes(&self, status: Option<RuntimeStatus>, after: Option<String>, limit: u32) -> Result<Vec<Runtime>>;
    retried fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome>;
    retried fn expire_claims(&self, runtime_id: RuntimeId, claims: &[(TaskId, ClaimToken)]) -> Result<Vec<TaskMove>>;
    once fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon>;
    once fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity>;
    retried fn sweep(&self, policy: &SweepPolicy, oracle: &dyn LivenessOracle, due_since: Option<DateTime<Utc>>) -> Result<Option<SweepReport>>;
    once fn step_down(&self) -> Result<()>;
    once fn start(&self, task_id: TaskId, token: ClaimToken, acting: Option<RuntimeId>) -> Result<Task>;
    once fn extend_lease(&self, task_id: TaskId, token: ClaimToken, extend_by: Duration, acting: Option<RuntimeId>) -> Result<LeaseRenewal>;
    once fn complete(&self, task_id: TaskId, token: ClaimToken, result: Vec<u8>, acting: Option<RuntimeId>) -> Result<Task>;
    once fn fail(&self, task_id: TaskId, token: ClaimToken, failure: Failure, acting: Option<RuntimeId>) -> Result<FailOutcome>;
    once fn report_usage(&self, task_id: TaskId, token: ClaimToken, counters: BTreeMap<String, i64>, acting: Option<RuntimeId>) -> Result<Option<RuntimeId>>;
    once fn task_status(&self, task_id: TaskId, acting: Option<RuntimeId>) -> Result<(TaskStatus, u32)>;
    once fn enqueue(&self, task: NewTask) -> Result<Enqueued>;
    once fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>>;
    once fn get_task(&self, task_id: TaskId) -> Result<Task>;
    once fn task_usage(&self, task_id: TaskId) -> Result<BTreeMap<String, i64>>;
    once fn task_failures(&self, task_id: TaskId) -> Result<Vec<AttemptFailure>>;
    once fn list_tasks(&self, filter: TaskFilter, after: Option<PageCursor>, page_size: u32) -> Result<TaskPage>;
    retried fn cancel(&self, task_id: TaskId) -> Result<Task>;
    retried fn retry_task(&self, task_id: TaskId) -> Result<Task>;
    once fn matching_task_ids(&self, filter: &TaskFilter, after: Option<TaskId>, limit: u32) -> Result<Vec<TaskId>>;
    retried fn cancel_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>>;
    retried fn retry_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>>;
    once fn describe_queue(&self, queue: &str) -> Result<QueueInfo>;
    retried fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo>;
    once fn queue_depths(&self) -> Result<Vec<QueueDepth>>;
    once fn queue_overview(&self, limit: u32) -> Result<QueueOverview>;
    once fn throughput(&self, since: DateTime<Utc>) -> Result<Vec<MinuteCount>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_conflicts_are_tried_again() {
        let conflict: Result<()> = Err(crate::domain::Error::StoreConflict("deadlock".into()));
        let unavailable: Result<()> = Err(crate::domain::Error::StoreUnavailable("down".into()));
        assert!(lost_to_a_conflict(&conflict));
        assert!(!lost_to_a_conflict(&unavailable));
        assert!(!lost_to_a_conflict(&Ok(())));
        assert!(conflict_pause(3) <= Duration::from_millis(23));
    }
}
