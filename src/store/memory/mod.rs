//! The embedded in-memory store: the same semantics as the PostgreSQL store, for development,
//! demos and tests. Nothing survives a restart.
//!
//! All state sits behind one synchronous mutex that is never held across an `.await` (no
//! method awaits anything while holding it), so every operation is atomic and none can lose
//! another's update. The fencing rules are `domain::fence::judge`, shared with PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::fence::{self, OwnerWrite, Verdict};
use crate::domain::liveness::{self, RedisView};
use crate::domain::transitions::{self, FailureCause};
use crate::domain::{
    ClaimEnd, ClaimToken, ClaimedTask, Error, FailureReason, PreviousClaim, QueueInfo, Result,
    Runtime, RuntimeId, RuntimeStatus, StatusCounts, Task, TaskId, TaskStatus,
};
use crate::store::{
    AttemptFailure, Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome,
    Failure, HeartbeatAck, LeaseRenewal, LivenessOracle, MinuteCount, NewApiKey, NewRuntime,
    NewTask, PageCursor, QueueDepth, QueueOverview, QueueUpdate, REMEMBERED_REVOKED_TOKENS,
    Recovered, RuntimeCredential, StorePolicy, SweepPolicy, SweepReport, TaskFilter, TaskMove,
    TaskPage, TaskStore,
};

mod credentials;
mod owner_writes;
mod reads;
mod runtimes;
mod state;
mod sweep;

use sweep::ServerFailure;

pub struct MemoryStore {
    state: Mutex<State>,
    policy: StorePolicy,
    /// Added to the wall clock. Zero in production; tests move it forward to let leases and
    /// delays pass without sleeping (`advance_clock`).
    clock_offset: Mutex<chrono::Duration>,
}

#[derive(Default)]
struct State {
    tasks: HashMap<TaskId, Task>,
    /// (queue, idempotency key) → task.
    idempotency: HashMap<(String, String), TaskId>,
    runtimes: HashMap<RuntimeId, Runtime>,
    runtime_names: HashMap<String, RuntimeId>,
    /// When each OFFLINE runtime went offline (the pinned-orphan grace counts from here).
    offline_since: HashMap<RuntimeId, DateTime<Utc>>,
    queues: HashMap<String, QueueSettings>,
    /// (queue, concurrency key) pairs held by a DISPATCHED/RUNNING task.
    busy_keys: HashSet<(String, String)>,
    /// Usage counters per (task, claim token).
    usage: HashMap<(TaskId, ClaimToken), BTreeMap<String, i64>>,
    /// Failed attempts per task, oldest first.
    failures: HashMap<TaskId, Vec<AttemptFailure>>,
    /// When the previous sweep began: a longer gap than usual is a blackout.
    last_swept_at: Option<DateTime<Utc>>,
    /// Runtime tokens, by runtime.
    runtime_credentials: HashMap<RuntimeId, RuntimeCredential>,
    /// API keys with their secrets' digests, in creation order.
    api_keys: Vec<(ApiKey, SecretDigest)>,
}

#[derive(Clone, Copy, Default)]
struct QueueSettings {
    max_concurrent: u32,
    paused: bool,
    default_execution_timeout: Option<Duration>,
}

impl MemoryStore {
    pub fn new(policy: StorePolicy) -> Self {
        Self {
            state: Mutex::new(State::default()),
            policy,
            clock_offset: Mutex::new(chrono::Duration::zero()),
        }
    }

    /// Test support: moves this store's clock forward. Production code never calls it; the
    /// store's time is always its own, never a client's.
    pub fn advance_clock(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
        *lock(&self.clock_offset) += by;
    }

    /// Wall clock plus the test offset, at PostgreSQL's microsecond precision so both stores
    /// order equal-looking timestamps alike.
    fn now(&self) -> DateTime<Utc> {
        micros(Utc::now() + *lock(&self.clock_offset))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Judges and, when allowed, applies an owner write with `apply`.
    fn fenced(
        &self,
        write: OwnerWrite,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
        apply: impl FnOnce(&mut State, TaskId, DateTime<Utc>),
    ) -> Result<(Task, Verdict)> {
        let now = self.now();
        let mut state = self.state();
        let task = state.task(task_id)?;
        let verdict = fence::judge(write, task, token, now);
        if verdict != Verdict::Replay && fence::held_by_another(task, acting) {
            return Err(Error::RuntimeMismatch);
        }
        match verdict {
            Verdict::Apply => apply(&mut state, task_id, now),
            Verdict::Replay => {}
            Verdict::Refuse(refusal) => return Err(Error::refused(refusal, task)),
        }
        Ok((state.task(task_id)?.clone(), verdict))
    }
}

/// A poisoned lock means a panic mid-update elsewhere; the state itself is still consistent
/// (every update is applied in full or not at all), so carry on with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// At PostgreSQL's microsecond precision.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    transitions::at_store_precision(at)
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered> {
        let now = self.now();
        let mut state = self.state();
        if !state.runtimes.contains_key(&runtime_id) {
            return Err(Error::RuntimeNotFound(runtime_id));
        }
        let orphans = state.held_by(runtime_id, TaskStatus::is_active);
        let failure = ServerFailure {
            reason: FailureReason::RuntimeRecovery,
            error: "the runtime restarted and declared the task lost",
        };
        let moved = orphans
            .into_iter()
            .map(|task_id| state.fail_for_server_reason(task_id, &failure, &self.policy, now))
            .collect();
        Ok(Recovered { moved })
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome> {
        let now = self.now();
        let mut state = self.state();
        let runtime = state
            .runtimes
            .get(&request.runtime_id)
            .cloned()
            .ok_or(Error::RuntimeNotFound(request.runtime_id))?;
        if runtime.status == RuntimeStatus::Offline {
            // Claiming is a sign of life: nothing it claims may be failed for a stale status.
            state.revive(runtime.id, now)?;
        }
        // What the runtime holds before the preflight, as the PostgreSQL store counts it (its
        // claim function counts before its preflight runs): a claim may take fewer, never more.
        let held = state.held_by(runtime.id, TaskStatus::is_active).len();
        let preflight = state.requeue_expired_leases(runtime.id, &self.policy, now);
        if request.max_tasks == 0 {
            return Ok(ClaimOutcome {
                claimed: Vec::new(),
                preflight,
            });
        }
        // Never beyond the runtime's max_concurrency (0 = no limit); under the lock, so racing
        // claims cannot both see the same free slots.
        let max_tasks = match runtime.max_concurrency {
            0 => request.max_tasks,
            most => {
                let free = (most as usize).saturating_sub(held);
                request
                    .max_tasks
                    .min(u32::try_from(free).unwrap_or(u32::MAX))
            }
        };
        // Claiming here is instantaneous and cannot outlive the caller's budget.
        let claimed = state.claim(
            &runtime,
            max_tasks,
            self.policy.lease_duration,
            request.auto_start,
            now,
        );
        Ok(ClaimOutcome { claimed, preflight })
    }

    async fn expire_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<Vec<TaskMove>> {
        let mut state = self.state();
        let unstarted: Vec<TaskId> = claims
            .iter()
            .filter(|(task_id, token)| {
                state.tasks.get(task_id).is_some_and(|task| {
                    task.claimed_by == Some(runtime_id)
                        && task.claim_token == Some(*token)
                        && task.status == TaskStatus::Dispatched
                })
            })
            .map(|(task_id, _)| *task_id)
            .collect();
        Ok(unstarted
            .into_iter()
            .map(|task_id| state.give_back_stream_claim(task_id))
            .collect())
    }

    async fn sweep(
        &self,
        policy: &SweepPolicy,
        oracle: &dyn LivenessOracle,
        due_since: Option<DateTime<Utc>>,
    ) -> Result<Option<SweepReport>> {
        let swept_at = self.now();
        let stale: Vec<RuntimeId> = {
            let mut state = self.state();
            state.credit_blackout(policy.interval, swept_at);
            state.stale_runtimes(swept_at - to_chrono(policy.offline_after))
        };
        // Asked without the lock held; the verdicts below are taken on the runtimes as they
        // are then, so a heartbeat that landed meanwhile vetoes a flip.
        let redis = oracle.view(&stale).await;
        let now = self.now();
        let mut state = self.state();
        let mut report = SweepReport {
            swept_at: Some(swept_at),
            ..SweepReport::default()
        };
        report.marked_offline =
            state.mark_silent_runtimes_offline(&stale, &redis, policy.offline_after, now);
        report.runtime_offline = state.fail_tasks_of_offline_runtimes(&self.policy, now);
        report.timed_out = state.fail_timed_out(policy, &self.policy, now);
        report.runtime_gone = state.fail_pinned_orphans(policy, now);
        if let Some(since) = due_since {
            report.became_available = state.became_available(since, swept_at);
        }
        if let Some(retain) = policy.retain_finished {
            report.deleted_finished = state.delete_finished(now - to_chrono(retain));
        }
        Ok(Some(report))
    }

    async fn start(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        owner_writes::start(self, task_id, token, acting)
    }

    async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Duration,
        acting: Option<RuntimeId>,
    ) -> Result<LeaseRenewal> {
        owner_writes::extend_lease(self, task_id, token, extend_by, acting)
    }

    async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        owner_writes::complete(self, task_id, token, result, acting)
    }

    async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        failure: Failure,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome> {
        owner_writes::fail(self, task_id, token, failure, acting)
    }

    async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<Option<RuntimeId>> {
        owner_writes::report_usage(self, task_id, token, counters, acting)
    }

    async fn task_status(
        &self,
        task_id: TaskId,
        acting: Option<RuntimeId>,
    ) -> Result<(TaskStatus, u32)> {
        let state = self.state();
        let task = state.task(task_id)?;
        if !fence::visible_to(task.claimed_by, task.runtime_id, acting) {
            return Err(Error::RuntimeMismatch);
        }
        Ok((task.status, task.attempt))
    }

    async fn enqueue(&self, new: NewTask) -> Result<Enqueued> {
        let now = self.now();
        self.state().enqueue(new, now)
    }

    async fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>> {
        let now = self.now();
        let mut state = self.state();
        Ok(tasks
            .into_iter()
            .map(|new| state.enqueue(new, now))
            .collect())
    }

    async fn get_task(&self, task_id: TaskId) -> Result<Task> {
        self.state().task(task_id).cloned()
    }

    async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        let now = self.now();
        let mut state = self.state();
        state.task(task_id)?;
        if let Some(status) = transitions::cancel(state.task_mut(task_id), now) {
            state.set_status(task_id, status);
        }
        Ok(state.task(task_id)?.clone())
    }

    async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        let now = self.now();
        let mut state = self.state();
        state.task(task_id)?;
        let status = transitions::redrive(state.task_mut(task_id), now)
            .map_err(|status| Error::NotRetryable { task_id, status })?;
        state.set_status(task_id, status);
        Ok(state.task(task_id)?.clone())
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        credentials::create(self, key)
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        credentials::list(self)
    }

    async fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey> {
        credentials::revoke(self, key_id)
    }

    async fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>> {
        credentials::find(self, key_id)
    }

    async fn note_api_key_used(&self, key_id: Uuid) -> Result<()> {
        credentials::note_used(self, key_id)
    }

    async fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>> {
        credentials::runtime(self, runtime_id)
    }

    async fn register_runtime(
        &self,
        runtime: NewRuntime,
        token_digest: SecretDigest,
    ) -> Result<Runtime> {
        runtimes::register(self, runtime, token_digest)
    }

    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        runtimes::heartbeat(self, runtime_id)
    }

    async fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
        runtimes::touch(self, runtimes)
    }

    async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
        runtimes::deregister(self, runtime_id)
    }

    async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Runtime>> {
        runtimes::list(self, status, after, limit)
    }

    async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        runtimes::capacity(self, runtime_id)
    }

    async fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
        runtimes::horizon(self, runtime_id)
    }

    async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage> {
        reads::list_tasks(self, filter, after, page_size)
    }

    async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        reads::depths(self)
    }

    async fn task_failures(&self, task_id: TaskId) -> Result<Vec<AttemptFailure>> {
        Ok(self
            .state()
            .failures
            .get(&task_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn task_usage(&self, task_id: TaskId) -> Result<BTreeMap<String, i64>> {
        reads::task_usage(self, task_id)
    }

    async fn queue_overview(&self, limit: u32) -> Result<QueueOverview> {
        reads::overview(self, limit)
    }

    async fn throughput(&self, since: DateTime<Utc>) -> Result<Vec<MinuteCount>> {
        reads::throughput(self, since)
    }

    async fn matching_task_ids(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>> {
        reads::matching_task_ids(self, filter, after, limit)
    }

    async fn cancel_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>> {
        let mut cancelled = Vec::new();
        for task_id in task_ids {
            let active = self
                .state()
                .tasks
                .get(task_id)
                .is_some_and(|task| !task.status.is_terminal());
            if active {
                cancelled.push(self.cancel(*task_id).await?);
            }
        }
        Ok(cancelled)
    }

    async fn retry_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>> {
        let mut redriven = Vec::new();
        for task_id in task_ids {
            match self.retry_task(*task_id).await {
                Ok(task) => redriven.push(task),
                Err(Error::NotRetryable { .. } | Error::TaskNotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(redriven)
    }

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        reads::describe(self, queue)
    }

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        reads::update(self, queue, update)
    }
}
