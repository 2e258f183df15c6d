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
use crate::domain::{
    ClaimEnd, ClaimToken, ClaimedTask, Error, FailureReason, PreviousClaim, QueueInfo, Result,
    Runtime, RuntimeId, RuntimeStatus, StatusCounts, Task, TaskId, TaskStatus, retry,
};
use crate::store::{
    Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome, Failure,
    HeartbeatAck, LeaseRenewal, LivenessOracle, NewApiKey, NewRuntime, NewTask, PageCursor,
    QueueDepth, QueueUpdate, REMEMBERED_REVOKED_TOKENS, Recovered, RuntimeCredential, StorePolicy,
    SweepPolicy, SweepReport, TaskFilter, TaskMove, TaskPage, TaskStore,
};

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

/// A failure the server decides on (sweeper, RecoverOrphans).
struct ServerFailure {
    reason: FailureReason,
    error: &'static str,
}

impl ServerFailure {
    const DISPATCH_TIMEOUT: ServerFailure = ServerFailure {
        reason: FailureReason::DispatchTimeout,
        error: "the task was dispatched but not started within the dispatch timeout",
    };
    const EXECUTION_TIMEOUT: ServerFailure = ServerFailure {
        reason: FailureReason::ExecutionTimeout,
        error: "the task ran longer than its execution timeout",
    };
}

/// At PostgreSQL's microsecond precision.
fn micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

fn to_chrono(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

impl State {
    fn task(&self, task_id: TaskId) -> Result<&Task> {
        self.tasks.get(&task_id).ok_or(Error::TaskNotFound(task_id))
    }

    /// The task, which callers have just looked up under the same lock.
    fn task_mut(&mut self, task_id: TaskId) -> &mut Task {
        self.tasks
            .get_mut(&task_id)
            .unwrap_or_else(|| unreachable!("task {task_id} vanished under the lock"))
    }

    fn settings(&self, queue: &str) -> QueueSettings {
        self.queues.get(queue).copied().unwrap_or_default()
    }

    fn active_in(&self, queue: &str) -> u32 {
        let active = self
            .tasks
            .values()
            .filter(|task| task.queue == queue && task.status.is_active())
            .count();
        u32::try_from(active).unwrap_or(u32::MAX)
    }

    /// Moves a task to `status`, freeing its concurrency key when it leaves DISPATCHED/RUNNING
    /// (the PostgreSQL store's trigger).
    fn set_status(&mut self, task_id: TaskId, status: TaskStatus) {
        let task = self.task_mut(task_id);
        let was_active = task.status.is_active();
        task.status = status;
        let key = task
            .concurrency_key
            .clone()
            .map(|key| (task.queue.clone(), key));
        if was_active
            && !status.is_active()
            && let Some(key) = key
        {
            self.busy_keys.remove(&key);
        }
    }

    /// T4 for one runtime, with the T10 poison guard.
    fn requeue_expired_leases(
        &mut self,
        runtime_id: RuntimeId,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> Vec<TaskMove> {
        let expired: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|task| {
                task.claimed_by == Some(runtime_id)
                    && task.status == TaskStatus::Dispatched
                    && task.lease_expires_at.is_some_and(|expiry| expiry < now)
            })
            .map(|task| task.id)
            .collect();
        expired
            .into_iter()
            .map(|task_id| self.expire_claim(task_id, policy, now))
            .collect()
    }

    /// Ends a DISPATCHED task's claim as a lease expiry: back to QUEUED, or FAILED by the
    /// poison guard (T10).
    /// T4': a claim stream ended; its unstarted claim goes back to QUEUED at once. Not a lease
    /// expiry for the poison guard: the task never ran, and a flapping client must not fail a
    /// queue's tasks (spec §2). A late StartTask with the token gets LEASE_EXPIRED.
    fn give_back_stream_claim(&mut self, task_id: TaskId) -> TaskMove {
        let task = self.task_mut(task_id);
        task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
            token,
            end: ClaimEnd::LeaseExpired,
        });
        task.lease_expires_at = None;
        self.set_status(task_id, TaskStatus::Queued);
        TaskMove::from(&*self.task_mut(task_id))
    }

    fn expire_claim(
        &mut self,
        task_id: TaskId,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> TaskMove {
        {
            let task = self.task_mut(task_id);
            task.lease_expirations += 1;
            task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
                token,
                end: ClaimEnd::LeaseExpired,
            });
            task.lease_expires_at = None;
            let poisoned = task.lease_expirations > policy.max_lease_expirations;
            if poisoned {
                task.failure_reason = Some(FailureReason::LeaseExpiredTooOften);
                task.error = Some(format!("lease expired {} times", task.lease_expirations));
                task.finished_at = Some(now);
            }
            let status = if poisoned {
                TaskStatus::Failed
            } else {
                TaskStatus::Queued
            };
            self.set_status(task_id, status);
        }
        TaskMove::from(&*self.task_mut(task_id))
    }

    /// T2: the same selection as `leasehold_claim`: the best `max_tasks` candidates, then at
    /// most one per concurrency key and no more than a capped queue's room.
    fn claim(
        &mut self,
        runtime: &Runtime,
        max_tasks: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Vec<ClaimedTask> {
        let room: HashMap<&str, u32> = runtime
            .queues
            .iter()
            .filter_map(|queue| {
                let cap = self.settings(queue).max_concurrent;
                (cap > 0).then(|| (queue.as_str(), cap.saturating_sub(self.active_in(queue))))
            })
            .collect();
        let mut candidates: Vec<&Task> = self
            .tasks
            .values()
            .filter(|task| {
                task.status == TaskStatus::Queued
                    && runtime.queues.contains(&task.queue)
                    && task.runtime_id.is_none_or(|pin| pin == runtime.id)
                    && task.available_at <= now
                    && !self.settings(&task.queue).paused
                    && room.get(task.queue.as_str()).is_none_or(|room| *room > 0)
                    && task.concurrency_key.as_ref().is_none_or(|key| {
                        !self.busy_keys.contains(&(task.queue.clone(), key.clone()))
                    })
            })
            .collect();
        candidates.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.created_at.cmp(&b.created_at))
                .then(a.id.cmp(&b.id))
        });
        candidates.truncate(max_tasks as usize);

        let mut keys_taken = HashSet::new();
        let mut taken_per_queue: HashMap<&str, u32> = HashMap::new();
        let mut chosen = Vec::new();
        for task in candidates {
            if let Some(key) = &task.concurrency_key
                && !keys_taken.insert((task.queue.as_str(), key.as_str()))
            {
                continue;
            }
            let taken = taken_per_queue.entry(task.queue.as_str()).or_default();
            *taken += 1;
            if room
                .get(task.queue.as_str())
                .is_some_and(|room| *taken > *room)
            {
                continue;
            }
            chosen.push(task.id);
        }
        chosen
            .into_iter()
            .map(|task_id| self.dispatch(task_id, runtime.id, lease, now))
            .collect()
    }

    fn dispatch(
        &mut self,
        task_id: TaskId,
        runtime_id: RuntimeId,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> ClaimedTask {
        let claim_token = ClaimToken::new_random();
        let lease_expires_at = now + to_chrono(lease);
        let task = self.task_mut(task_id);
        task.claim_token = Some(claim_token);
        task.claimed_by = Some(runtime_id);
        task.dispatched_at = Some(now);
        task.lease_expires_at = Some(lease_expires_at);
        if let Some(key) = task.concurrency_key.clone() {
            let queue = task.queue.clone();
            self.busy_keys.insert((queue, key));
        }
        self.set_status(task_id, TaskStatus::Dispatched);
        ClaimedTask {
            task: self.task_mut(task_id).clone(),
            claim_token,
            lease_expires_at,
        }
    }

    fn fail(
        &mut self,
        task_id: TaskId,
        failure: &Failure,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) {
        let task = self.task_mut(task_id);
        let retrying = retry::will_retry(failure.retryable, task.attempt, task.max_attempts);
        task.error = Some(failure.error.clone());
        task.failure_reason = Some(FailureReason::TaskError);
        task.lease_expires_at = None;
        if !retrying {
            task.finished_at = Some(now);
            self.set_status(task_id, TaskStatus::Failed);
            return;
        }
        let delay = policy.retry_backoff.delay(task.attempt, failure.jitter);
        task.available_at = micros(now + to_chrono(delay));
        task.attempt += 1;
        task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
            token,
            end: ClaimEnd::Retried,
        });
        self.set_status(task_id, TaskStatus::Queued);
    }

    /// T1, or the existing task when the idempotency key is taken in the queue.
    fn enqueue(&mut self, new: NewTask, now: DateTime<Utc>) -> Result<Enqueued> {
        let state = self;
        if let Some(key) = &new.idempotency_key
            && let Some(existing) = state.idempotency.get(&(new.queue.clone(), key.clone()))
        {
            return Ok(Enqueued {
                task: state.task(*existing)?.clone(),
                deduplicated: true,
            });
        }
        if let Some(pin) = new.pinned_to
            && !state.runtimes.contains_key(&pin)
        {
            return Err(Error::RuntimeNotFound(pin));
        }
        let task = Task {
            id: TaskId::new_random(),
            queue: new.queue,
            runtime_id: new.pinned_to,
            concurrency_key: new.concurrency_key,
            priority: new.priority,
            payload: new.payload,
            metadata: new.metadata,
            status: TaskStatus::Queued,
            attempt: 1,
            max_attempts: new.max_attempts,
            lease_expirations: 0,
            claimed_by: None,
            claim_token: None,
            previous_claim: None,
            idempotency_key: new.idempotency_key,
            execution_timeout: new.execution_timeout,
            created_at: now,
            available_at: now + to_chrono(new.delay),
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            lease_expires_at: None,
            result: None,
            error: None,
            failure_reason: None,
        };
        if let Some(key) = &task.idempotency_key {
            state
                .idempotency
                .insert((task.queue.clone(), key.clone()), task.id);
        }
        state.tasks.insert(task.id, task.clone());
        Ok(Enqueued {
            task,
            deduplicated: false,
        })
    }

    /// Tasks claimed by `runtime_id` whose status passes `held`.
    fn held_by(&self, runtime_id: RuntimeId, held: impl Fn(TaskStatus) -> bool) -> Vec<TaskId> {
        self.tasks
            .values()
            .filter(|task| task.claimed_by == Some(runtime_id) && held(task.status))
            .map(|task| task.id)
            .collect()
    }

    fn mark_offline(&mut self, runtime_id: RuntimeId, now: DateTime<Utc>) -> Result<()> {
        let runtime = self
            .runtimes
            .get_mut(&runtime_id)
            .ok_or(Error::RuntimeNotFound(runtime_id))?;
        runtime.status = RuntimeStatus::Offline;
        self.offline_since.entry(runtime_id).or_insert(now);
        Ok(())
    }

    fn stale_runtimes(&self, seen_before: DateTime<Utc>) -> Vec<RuntimeId> {
        self.runtimes
            .keys()
            .copied()
            .filter(|id| self.is_stale(*id, seen_before))
            .collect()
    }

    fn is_stale(&self, runtime_id: RuntimeId, seen_before: DateTime<Utc>) -> bool {
        self.runtimes.get(&runtime_id).is_some_and(|runtime| {
            runtime.status == RuntimeStatus::Online && runtime.last_seen_at < seen_before
        })
    }

    /// Moves an ONLINE runtime's `last_seen_at` forward to `seen_at` (never back); false
    /// for an unknown or OFFLINE runtime.
    fn refresh_last_seen(&mut self, runtime_id: RuntimeId, seen_at: DateTime<Utc>) -> bool {
        match self.runtimes.get_mut(&runtime_id) {
            Some(runtime) if runtime.status == RuntimeStatus::Online => {
                runtime.last_seen_at = runtime.last_seen_at.max(seen_at);
                true
            }
            _ => false,
        }
    }

    /// A heartbeat, or a claim by an OFFLINE runtime: seen now, and ONLINE.
    fn revive(&mut self, runtime_id: RuntimeId, now: DateTime<Utc>) -> Result<()> {
        let runtime = self
            .runtimes
            .get_mut(&runtime_id)
            .ok_or(Error::RuntimeNotFound(runtime_id))?;
        runtime.last_seen_at = now;
        runtime.status = RuntimeStatus::Online;
        self.offline_since.remove(&runtime_id);
        Ok(())
    }

    /// Sweeper stage 1 (see `domain::liveness`).
    fn mark_silent_runtimes_offline(
        &mut self,
        candidates: &[RuntimeId],
        redis: &RedisView,
        offline_after: Duration,
        now: DateTime<Utc>,
    ) -> Vec<RuntimeId> {
        let mut marked = Vec::new();
        for &runtime_id in candidates {
            let Some(runtime) = self.runtimes.get(&runtime_id) else {
                continue;
            };
            if runtime.status != RuntimeStatus::Online {
                continue;
            }
            let database_age = (now - runtime.last_seen_at).to_std().unwrap_or_default();
            match liveness::verdict(runtime_id, database_age, redis, offline_after) {
                liveness::Verdict::Alive { seen_ago } => {
                    self.refresh_last_seen(runtime_id, now - to_chrono(seen_ago));
                }
                liveness::Verdict::Offline => {
                    if self.mark_offline(runtime_id, now).is_ok() {
                        marked.push(runtime_id);
                    }
                }
                liveness::Verdict::Undecided => {}
            }
        }
        marked
    }

    /// A gap since the previous sweep longer than usual is not counted against any ONLINE
    /// runtime (`domain::liveness::blackout_credit`).
    fn credit_blackout(&mut self, interval: Duration, now: DateTime<Utc>) {
        let previous = self.last_swept_at.replace(now);
        let gap = previous.and_then(|previous| (now - previous).to_std().ok());
        if let Some(credit) = gap.and_then(|gap| liveness::blackout_credit(gap, interval)) {
            for runtime in self.runtimes.values_mut() {
                if runtime.status == RuntimeStatus::Online {
                    runtime.last_seen_at = (runtime.last_seen_at + to_chrono(credit)).min(now);
                }
            }
        }
    }

    /// Sweeper stage 2.
    fn fail_tasks_of_offline_runtimes(
        &mut self,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> Vec<TaskMove> {
        let orphans: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|task| {
                task.status.is_active()
                    && task.claimed_by.is_some_and(|runtime| {
                        self.runtimes
                            .get(&runtime)
                            .is_some_and(|runtime| runtime.status == RuntimeStatus::Offline)
                    })
            })
            .map(|task| task.id)
            .collect();
        let failure = ServerFailure {
            reason: FailureReason::RuntimeOffline,
            error: "the runtime holding the task went offline",
        };
        orphans
            .into_iter()
            .map(|task_id| self.fail_for_server_reason(task_id, &failure, policy, now))
            .collect()
    }

    /// Sweeper stage 3.
    fn fail_timed_out(
        &mut self,
        sweep: &SweepPolicy,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> Vec<TaskMove> {
        let dispatched_before = now - to_chrono(sweep.dispatch_timeout);
        let mut timed_out: Vec<(TaskId, ServerFailure)> = Vec::new();
        for task in self.tasks.values() {
            let dispatch_timed_out = task.status == TaskStatus::Dispatched
                && task.dispatched_at.is_some_and(|at| at < dispatched_before);
            let timeout = task.execution_timeout.or_else(|| {
                self.queues
                    .get(&task.queue)
                    .and_then(|queue| queue.default_execution_timeout)
            });
            let execution_timed_out = task.status == TaskStatus::Running
                && task
                    .started_at
                    .zip(timeout)
                    .is_some_and(|(started, timeout)| started + to_chrono(timeout) < now);
            if dispatch_timed_out {
                timed_out.push((task.id, ServerFailure::DISPATCH_TIMEOUT));
            } else if execution_timed_out {
                timed_out.push((task.id, ServerFailure::EXECUTION_TIMEOUT));
            }
        }
        timed_out
            .into_iter()
            .map(|(task_id, failure)| self.fail_for_server_reason(task_id, &failure, policy, now))
            .collect()
    }

    /// Retention: finished tasks that finished before `finished_before` are forgotten, with
    /// their usage counters and idempotency keys.
    fn delete_finished(&mut self, finished_before: DateTime<Utc>) -> u64 {
        let expired: HashSet<TaskId> = self
            .tasks
            .values()
            .filter(|task| task.status.is_terminal())
            .filter(|task| task.finished_at.is_some_and(|at| at < finished_before))
            .map(|task| task.id)
            .collect();
        for task_id in &expired {
            if let Some(task) = self.tasks.remove(task_id)
                && let Some(key) = task.idempotency_key
            {
                self.idempotency.remove(&(task.queue, key));
            }
        }
        self.usage
            .retain(|(task_id, _), _| !expired.contains(task_id));
        expired.len() as u64
    }

    /// Sweeper stage 4.
    fn fail_pinned_orphans(&mut self, sweep: &SweepPolicy, now: DateTime<Utc>) -> Vec<TaskMove> {
        let gone_before = now - to_chrono(sweep.pinned_orphan_grace);
        let orphans: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|task| {
                task.status == TaskStatus::Queued
                    && task.runtime_id.is_some_and(|pin| {
                        self.offline_since
                            .get(&pin)
                            .is_some_and(|since| *since < gone_before)
                    })
            })
            .map(|task| task.id)
            .collect();
        orphans
            .into_iter()
            .map(|task_id| {
                let task = self.task_mut(task_id);
                task.failure_reason = Some(FailureReason::RuntimeGone);
                task.error =
                    Some("the pinned runtime has been offline for longer than the grace".into());
                task.finished_at = Some(now);
                self.set_status(task_id, TaskStatus::Failed);
                TaskMove::from(&*self.task_mut(task_id))
            })
            .collect()
    }

    /// Sweeper stage 5: one task per (queue, pin) that became available in `(since, until]`.
    fn became_available(&self, since: DateTime<Utc>, until: DateTime<Utc>) -> Vec<TaskMove> {
        let mut seen = HashSet::new();
        self.tasks
            .values()
            .filter(|task| {
                task.status == TaskStatus::Queued
                    && task.available_at > since
                    && task.available_at <= until
                    && seen.insert((task.queue.clone(), task.runtime_id))
            })
            .map(TaskMove::from)
            .collect()
    }

    /// A server-side failure (always retryable): the `sql::fail_for_server_reason!` of the
    /// PostgreSQL store.
    fn fail_for_server_reason(
        &mut self,
        task_id: TaskId,
        failure: &ServerFailure,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> TaskMove {
        let task = self.task_mut(task_id);
        let retrying = retry::will_retry(true, task.attempt, task.max_attempts);
        task.error = Some(failure.error.to_owned());
        task.failure_reason = Some(failure.reason);
        task.lease_expires_at = None;
        if retrying {
            let delay = policy
                .retry_backoff
                .delay(task.attempt, rand::random::<f64>());
            task.available_at = micros(now + to_chrono(delay));
            task.attempt += 1;
            task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
                token,
                end: ClaimEnd::Requeued,
            });
            self.set_status(task_id, TaskStatus::Queued);
        } else {
            task.finished_at = Some(now);
            self.set_status(task_id, TaskStatus::Failed);
        }
        TaskMove::from(&*self.task_mut(task_id))
    }

    fn holds_active_claim(task: &Task, token: ClaimToken, now: DateTime<Utc>) -> bool {
        task.claim_token == Some(token)
            && match task.status {
                TaskStatus::Running => true,
                TaskStatus::Dispatched => task.lease_expires_at.is_some_and(|expiry| expiry >= now),
                _ => false,
            }
    }
}

#[async_trait]
impl TaskStore for MemoryStore {
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        let now = self.now();
        let api_key = ApiKey {
            id: key.id,
            name: key.name,
            grants: key.grants,
            created_at: now,
            expires_at: key.expires_in.map(|expires_in| now + to_chrono(expires_in)),
            last_used_at: None,
            revoked_at: None,
        };
        self.state().api_keys.push((api_key.clone(), key.digest));
        Ok(api_key)
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        Ok(self
            .state()
            .api_keys
            .iter()
            .map(|(key, _)| key.clone())
            .collect())
    }

    async fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey> {
        let now = self.now();
        let mut state = self.state();
        let (key, _) = state
            .api_keys
            .iter_mut()
            .find(|(key, _)| key.id == key_id)
            .ok_or(Error::ApiKeyNotFound(key_id))?;
        key.revoked_at.get_or_insert(now);
        Ok(key.clone())
    }

    async fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>> {
        Ok(self
            .state()
            .api_keys
            .iter()
            .find(|(key, _)| key.id == key_id)
            .cloned())
    }

    async fn note_api_key_used(&self, key_id: Uuid) -> Result<()> {
        let now = self.now();
        if let Some((key, _)) = self
            .state()
            .api_keys
            .iter_mut()
            .find(|(key, _)| key.id == key_id)
        {
            key.last_used_at = Some(now);
        }
        Ok(())
    }

    async fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>> {
        Ok(self.state().runtime_credentials.get(&runtime_id).cloned())
    }

    async fn register_runtime(
        &self,
        runtime: NewRuntime,
        token_digest: SecretDigest,
    ) -> Result<Runtime> {
        let now = self.now();
        let mut state = self.state();
        let id = state
            .runtime_names
            .get(&runtime.name)
            .copied()
            .unwrap_or_else(RuntimeId::new_random);
        let registered_at = state
            .runtimes
            .get(&id)
            .map_or(now, |known| known.registered_at);
        let registered = Runtime {
            id,
            name: runtime.name.clone(),
            queues: runtime.queues,
            labels: runtime.labels,
            max_concurrency: runtime.max_concurrency,
            status: RuntimeStatus::Online,
            last_seen_at: now,
            registered_at,
        };
        state.runtime_names.insert(runtime.name, id);
        state.runtimes.insert(id, registered.clone());
        let credential = state.runtime_credentials.entry(id).or_default();
        if let Some(replaced) = credential.current.replace(token_digest) {
            credential.revoked.insert(0, replaced);
            credential.revoked.truncate(REMEMBERED_REVOKED_TOKENS);
        }
        state.offline_since.remove(&id);
        Ok(registered)
    }

    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        let now = self.now();
        self.state().revive(runtime_id, now)?;
        Ok(HeartbeatAck {
            server_time: now,
            status: RuntimeStatus::Online,
        })
    }

    async fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
        let now = self.now();
        let mut state = self.state();
        Ok(runtimes
            .iter()
            .copied()
            .filter(|id| state.refresh_last_seen(*id, now))
            .collect())
    }

    async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
        let now = self.now();
        let mut state = self.state();
        state.mark_offline(runtime_id, now)?;
        let unstarted = state.held_by(runtime_id, |status| status == TaskStatus::Dispatched);
        let mut moved = Vec::with_capacity(unstarted.len());
        for task_id in unstarted {
            let task = state.task_mut(task_id);
            task.previous_claim = task.claim_token.take().map(|token| PreviousClaim {
                token,
                end: ClaimEnd::Requeued,
            });
            task.lease_expires_at = None;
            state.set_status(task_id, TaskStatus::Queued);
            moved.push(TaskMove::from(&*state.task_mut(task_id)));
        }
        Ok(moved)
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

    async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Runtime>> {
        let state = self.state();
        let mut runtimes: Vec<Runtime> = state
            .runtimes
            .values()
            .filter(|runtime| status.is_none_or(|status| runtime.status == status))
            .filter(|runtime| after.as_ref().is_none_or(|after| runtime.name > *after))
            .cloned()
            .collect();
        runtimes.sort_by(|a, b| a.name.cmp(&b.name));
        runtimes.truncate(limit as usize);
        Ok(runtimes)
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
        let claimed = state.claim(&runtime, max_tasks, self.policy.lease_duration, now);
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

    async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        let state = self.state();
        let runtime = state
            .runtimes
            .get(&runtime_id)
            .ok_or(Error::RuntimeNotFound(runtime_id))?;
        let held = state.held_by(runtime_id, TaskStatus::is_active).len();
        Ok(Capacity {
            max_concurrency: runtime.max_concurrency,
            held: u32::try_from(held).unwrap_or(u32::MAX),
        })
    }

    async fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
        let now = self.now();
        let state = self.state();
        let runtime = state
            .runtimes
            .get(&runtime_id)
            .ok_or(Error::RuntimeNotFound(runtime_id))?;
        let time_left = |at: DateTime<Utc>| (at - now).to_std().unwrap_or_default();
        let own_lease = state
            .tasks
            .values()
            .filter(|task| {
                task.claimed_by == Some(runtime_id) && task.status == TaskStatus::Dispatched
            })
            .filter_map(|task| task.lease_expires_at)
            .min()
            .map(time_left);
        let next_available = state
            .tasks
            .values()
            .filter(|task| {
                task.status == TaskStatus::Queued
                    && runtime.queues.contains(&task.queue)
                    && task.available_at > now
            })
            .map(|task| task.available_at)
            .min()
            .map(time_left);
        let mut queues = runtime.queues.clone();
        queues.sort();
        Ok(ClaimHorizon {
            queues,
            own_lease,
            next_available,
        })
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
        let start = |state: &mut State, task_id, now| {
            let task = state.task_mut(task_id);
            task.started_at = Some(now);
            state.set_status(task_id, TaskStatus::Running);
        };
        let (task, _) = self.fenced(OwnerWrite::Start, task_id, token, acting, start)?;
        Ok(task)
    }

    async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Duration,
        acting: Option<RuntimeId>,
    ) -> Result<LeaseRenewal> {
        let (task, _) = self.fenced(
            OwnerWrite::ExtendLease,
            task_id,
            token,
            acting,
            |state, task_id, now| {
                let task = state.task_mut(task_id);
                let renewed = now + to_chrono(extend_by);
                task.lease_expires_at = task.lease_expires_at.max(Some(renewed));
            },
        )?;
        let lease_expires_at = task
            .lease_expires_at
            .ok_or_else(|| Error::Internal("an extended lease has no expiry".into()))?;
        Ok(LeaseRenewal {
            lease_expires_at,
            runtime_id: task.claimed_by,
        })
    }

    async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        let (task, _) = self.fenced(
            OwnerWrite::Complete,
            task_id,
            token,
            acting,
            |state, task_id, now| {
                let task = state.task_mut(task_id);
                task.result = Some(result);
                task.finished_at = Some(now);
                task.lease_expires_at = None;
                state.set_status(task_id, TaskStatus::Completed);
            },
        )?;
        Ok(task)
    }

    async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        failure: Failure,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome> {
        let policy = self.policy;
        let (task, verdict) = self.fenced(
            OwnerWrite::Fail,
            task_id,
            token,
            acting,
            |state, task_id, now| {
                state.fail(task_id, &failure, &policy, now);
            },
        )?;
        let will_retry = match verdict {
            Verdict::Replay => fence::replayed_fail_retried(&task, token),
            _ => task.status == TaskStatus::Queued,
        };
        Ok(FailOutcome { task, will_retry })
    }

    async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<Option<RuntimeId>> {
        let now = self.now();
        let mut state = self.state();
        let task = state.task(task_id)?;
        let holder = task.claimed_by;
        let held_by_another = fence::held_by_another(task, acting);
        if State::holds_active_claim(task, token, now) && !held_by_another {
            state
                .usage
                .entry((task_id, token))
                .or_default()
                .extend(counters);
            return Ok(holder);
        }
        let stored = state.usage.get(&(task_id, token));
        let already_reported = !counters.is_empty()
            && stored.is_some_and(|stored| {
                counters
                    .iter()
                    .all(|(name, value)| stored.get(name) == Some(value))
            });
        if already_reported {
            return Ok(holder);
        }
        if held_by_another {
            return Err(Error::RuntimeMismatch);
        }
        match fence::judge(OwnerWrite::ReportUsage, task, token, now) {
            Verdict::Refuse(refusal) => Err(Error::refused(refusal, task)),
            Verdict::Apply | Verdict::Replay => Err(Error::Internal(
                "the fence allowed a usage report the claim check refused".into(),
            )),
        }
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

    async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage> {
        let state = self.state();
        let mut matching: Vec<&Task> = state
            .tasks
            .values()
            .filter(|task| {
                filter
                    .queue
                    .as_ref()
                    .is_none_or(|queue| &task.queue == queue)
                    && (filter.statuses.is_empty() || filter.statuses.contains(&task.status))
                    && filter.runtime_id.is_none_or(|runtime| {
                        task.runtime_id == Some(runtime) || task.claimed_by == Some(runtime)
                    })
                    && after.is_none_or(|cursor| {
                        (task.created_at, task.id) > (cursor.created_at, cursor.id)
                    })
            })
            .collect();
        matching.sort_by_key(|task| (task.created_at, task.id));
        let more = matching.len() > page_size as usize;
        matching.truncate(page_size as usize);
        let next = if more {
            matching.last().map(|last| PageCursor {
                created_at: last.created_at,
                id: last.id,
            })
        } else {
            None
        };
        Ok(TaskPage {
            tasks: matching.into_iter().cloned().collect(),
            next,
        })
    }

    async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        let now = self.now();
        let mut state = self.state();
        let task = state.task(task_id)?;
        if !task.status.is_terminal() {
            let task = state.task_mut(task_id);
            task.finished_at = Some(now);
            task.failure_reason = Some(FailureReason::Cancelled);
            task.lease_expires_at = None;
            state.set_status(task_id, TaskStatus::Cancelled);
        }
        Ok(state.task(task_id)?.clone())
    }

    async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        let now = self.now();
        let state = self.state();
        let mut depths: BTreeMap<&str, QueueDepth> = BTreeMap::new();
        for task in state
            .tasks
            .values()
            .filter(|task| !task.status.is_terminal())
        {
            let depth = depths
                .entry(task.queue.as_str())
                .or_insert_with(|| QueueDepth {
                    queue: task.queue.clone(),
                    queued: 0,
                    dispatched: 0,
                    running: 0,
                    oldest_queued_age: None,
                });
            match task.status {
                TaskStatus::Queued => {
                    depth.queued += 1;
                    let age = (now - task.created_at).to_std().unwrap_or_default();
                    depth.oldest_queued_age = depth.oldest_queued_age.max(Some(age));
                }
                TaskStatus::Dispatched => depth.dispatched += 1,
                _ => depth.running += 1,
            }
        }
        Ok(depths.into_values().collect())
    }

    async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        let now = self.now();
        let mut state = self.state();
        let status = state.task(task_id)?.status;
        if !matches!(status, TaskStatus::Failed | TaskStatus::Cancelled) {
            return Err(Error::NotRetryable { task_id, status });
        }
        let task = state.task_mut(task_id);
        if let Some(token) = task.claim_token.take() {
            task.previous_claim = Some(PreviousClaim {
                token,
                end: ClaimEnd::Requeued,
            });
        }
        task.attempt = 1;
        task.lease_expirations = 0;
        task.available_at = now;
        task.dispatched_at = None;
        task.started_at = None;
        task.finished_at = None;
        task.lease_expires_at = None;
        task.result = None;
        task.error = None;
        task.failure_reason = None;
        state.set_status(task_id, TaskStatus::Queued);
        Ok(state.task(task_id)?.clone())
    }

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        let state = self.state();
        let settings = state.settings(queue);
        let mut counts = StatusCounts::default();
        let mut oldest_queued_at: Option<DateTime<Utc>> = None;
        for task in state.tasks.values().filter(|task| task.queue == queue) {
            counts.add(task.status, 1);
            if task.status == TaskStatus::Queued {
                oldest_queued_at = Some(
                    oldest_queued_at.map_or(task.created_at, |oldest| oldest.min(task.created_at)),
                );
            }
        }
        Ok(QueueInfo {
            name: queue.to_owned(),
            max_concurrent: settings.max_concurrent,
            paused: settings.paused,
            default_execution_timeout: settings.default_execution_timeout,
            counts,
            oldest_queued_at,
        })
    }

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        {
            let mut state = self.state();
            let settings = state.queues.entry(queue.to_owned()).or_default();
            if let Some(max_concurrent) = update.max_concurrent {
                settings.max_concurrent = max_concurrent;
            }
            if let Some(paused) = update.paused {
                settings.paused = paused;
            }
            if let Some(timeout) = update.default_execution_timeout {
                settings.default_execution_timeout = timeout;
            }
        }
        self.describe_queue(queue).await
    }
}
