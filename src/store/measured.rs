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
    Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome, Failure,
    HeartbeatAck, LeaseRenewal, LivenessOracle, NewApiKey, NewRuntime, NewTask, PageCursor,
    QueueDepth, QueueUpdate, Recovered, RuntimeCredential, SweepPolicy, SweepReport, TaskFilter,
    TaskMove, TaskPage, TaskStore,
};
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::{
    ClaimToken, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task, TaskId, TaskStatus,
};

pub struct MeasuredStore {
    inner: Arc<dyn TaskStore>,
}

impl MeasuredStore {
    pub fn new(inner: Arc<dyn TaskStore>) -> Self {
        Self { inner }
    }
}

fn record<T>(operation: &'static str, started: Instant, result: &Result<T>) {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!(
        "leasehold_store_call_duration_seconds",
        "operation" => operation,
        "outcome" => outcome
    )
    .record(started.elapsed().as_secs_f64());
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

/// Each method forwards to the wrapped store, again after a conflict, and records how long it
/// took. (The arguments are cloned for each attempt; most are ids.)
macro_rules! measured {
    ($( fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty; )*) => {
        #[async_trait]
        impl TaskStore for MeasuredStore {
            $(
                #[allow(clippy::clone_on_copy, clippy::redundant_clone)]
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    let started = Instant::now();
                    let mut attempt = 0;
                    loop {
                        let result = self.inner.$name($(Clone::clone(&$arg)),*).await;
                        if attempt < CONFLICT_RETRIES && lost_to_a_conflict(&result) {
                            attempt += 1;
                            metrics::counter!("leasehold_store_conflict_retries_total").increment(1);
                            tokio::time::sleep(conflict_pause(attempt)).await;
                            continue;
                        }
                        record(stringify!($name), started, &result);
                        return result;
                    }
                }
            )*
        }
    };
}

measured! {
    fn ping(&self) -> Result<()>;
    fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey>;
    fn list_api_keys(&self) -> Result<Vec<ApiKey>>;
    fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey>;
    fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>>;
    fn note_api_key_used(&self, key_id: Uuid) -> Result<()>;
    fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>>;
    fn register_runtime(&self, runtime: NewRuntime, token_digest: SecretDigest) -> Result<Runtime>;
    fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck>;
    fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>>;
    fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>>;
    fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered>;
    fn list_runtimes(&self, status: Option<RuntimeStatus>, after: Option<String>, limit: u32) -> Result<Vec<Runtime>>;
    fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome>;
    fn expire_claims(&self, runtime_id: RuntimeId, claims: &[(TaskId, ClaimToken)]) -> Result<Vec<TaskMove>>;
    fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon>;
    fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity>;
    fn sweep(&self, policy: &SweepPolicy, oracle: &dyn LivenessOracle, due_since: Option<DateTime<Utc>>) -> Result<Option<SweepReport>>;
    fn start(&self, task_id: TaskId, token: ClaimToken, acting: Option<RuntimeId>) -> Result<Task>;
    fn extend_lease(&self, task_id: TaskId, token: ClaimToken, extend_by: Duration, acting: Option<RuntimeId>) -> Result<LeaseRenewal>;
    fn complete(&self, task_id: TaskId, token: ClaimToken, result: Vec<u8>, acting: Option<RuntimeId>) -> Result<Task>;
    fn fail(&self, task_id: TaskId, token: ClaimToken, failure: Failure, acting: Option<RuntimeId>) -> Result<FailOutcome>;
    fn report_usage(&self, task_id: TaskId, token: ClaimToken, counters: BTreeMap<String, i64>, acting: Option<RuntimeId>) -> Result<Option<RuntimeId>>;
    fn task_status(&self, task_id: TaskId, acting: Option<RuntimeId>) -> Result<(TaskStatus, u32)>;
    fn enqueue(&self, task: NewTask) -> Result<Enqueued>;
    fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>>;
    fn get_task(&self, task_id: TaskId) -> Result<Task>;
    fn list_tasks(&self, filter: TaskFilter, after: Option<PageCursor>, page_size: u32) -> Result<TaskPage>;
    fn cancel(&self, task_id: TaskId) -> Result<Task>;
    fn retry_task(&self, task_id: TaskId) -> Result<Task>;
    fn describe_queue(&self, queue: &str) -> Result<QueueInfo>;
    fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo>;
    fn queue_depths(&self) -> Result<Vec<QueueDepth>>;
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
