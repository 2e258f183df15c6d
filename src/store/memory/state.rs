//! The embedded store's transitions, as the SQL statements of the PostgreSQL store make them:
//! claim and dispatch, lease expiry, failure with retry, enqueue.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;

impl State {
    pub(super) fn task(&self, task_id: TaskId) -> Result<&Task> {
        self.tasks.get(&task_id).ok_or(Error::TaskNotFound(task_id))
    }

    /// The task, which callers have just looked up under the same lock.
    pub(super) fn task_mut(&mut self, task_id: TaskId) -> &mut Task {
        self.tasks
            .get_mut(&task_id)
            .unwrap_or_else(|| unreachable!("task {task_id} vanished under the lock"))
    }

    pub(super) fn settings(&self, queue: &str) -> QueueSettings {
        self.queues.get(queue).copied().unwrap_or_default()
    }

    pub(super) fn active_in(&self, queue: &str) -> u32 {
        let active = self
            .tasks
            .values()
            .filter(|task| task.queue == queue && task.status.is_active())
            .count();
        u32::try_from(active).unwrap_or(u32::MAX)
    }

    /// Moves a task to `status`, freeing its concurrency key when it leaves DISPATCHED/RUNNING
    /// (the PostgreSQL store's trigger).
    pub(super) fn set_status(&mut self, task_id: TaskId, status: TaskStatus) {
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
    pub(super) fn requeue_expired_leases(
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

    /// T4': a claim stream ended; its unstarted claim goes back to QUEUED at once.
    pub(super) fn give_back_stream_claim(&mut self, task_id: TaskId) -> TaskMove {
        let status = transitions::give_back(self.task_mut(task_id));
        self.set_status(task_id, status);
        TaskMove::from(&*self.task_mut(task_id))
    }

    /// T4: a DISPATCHED task's claim ends as a lease expiry (with the T10 poison guard).
    pub(super) fn expire_claim(
        &mut self,
        task_id: TaskId,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> TaskMove {
        let task = self.task_mut(task_id);
        let status = transitions::expire_lease(task, policy.max_lease_expirations, now);
        self.set_status(task_id, status);
        TaskMove::from(&*self.task_mut(task_id))
    }

    /// T2: the same selection as `leasehold_claim`: the best `max_tasks` candidates, then at
    /// most one per concurrency key and no more than a capped queue's room.
    pub(super) fn claim(
        &mut self,
        runtime: &Runtime,
        max_tasks: u32,
        lease: Duration,
        auto_start: bool,
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
            .map(|task_id| self.dispatch(task_id, runtime.id, lease, auto_start, now))
            .collect()
    }

    pub(super) fn dispatch(
        &mut self,
        task_id: TaskId,
        runtime_id: RuntimeId,
        lease: Duration,
        auto_start: bool,
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
        if auto_start {
            self.task_mut(task_id).started_at = Some(now);
            self.set_status(task_id, TaskStatus::Running);
        } else {
            self.set_status(task_id, TaskStatus::Dispatched);
        }
        ClaimedTask {
            task: self.task_mut(task_id).clone(),
            claim_token,
            lease_expires_at,
        }
    }

    /// T6: the worker failed the task.
    pub(super) fn fail(
        &mut self,
        task_id: TaskId,
        failure: &Failure,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) {
        let cause = FailureCause {
            reason: FailureReason::TaskError,
            error: failure.error.clone(),
            retryable: failure.retryable,
            retried_claim_ends_as: ClaimEnd::Retried,
        };
        self.apply_failure(task_id, cause, policy, failure.jitter, now);
    }

    /// A failure (the worker's or the server's): the transition, and its attempt recorded.
    pub(super) fn apply_failure(
        &mut self,
        task_id: TaskId,
        cause: FailureCause,
        policy: &StorePolicy,
        jitter: f64,
        now: DateTime<Utc>,
    ) {
        let task = self.task_mut(task_id);
        let failed_attempt = task.attempt;
        let record = AttemptFailure {
            attempt: failed_attempt,
            failed_at: now,
            reason: cause.reason,
            error: Some(cause.error.clone()),
        };
        let status = transitions::fail(task, cause, &policy.retry_backoff, jitter, now);
        self.set_status(task_id, status);
        self.failures.entry(task_id).or_default().push(record);
    }

    /// T1, or the existing task when the idempotency key is taken in the queue.
    pub(super) fn enqueue(&mut self, new: NewTask, now: DateTime<Utc>) -> Result<Enqueued> {
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
    pub(super) fn held_by(
        &self,
        runtime_id: RuntimeId,
        held: impl Fn(TaskStatus) -> bool,
    ) -> Vec<TaskId> {
        self.tasks
            .values()
            .filter(|task| task.claimed_by == Some(runtime_id) && held(task.status))
            .map(|task| task.id)
            .collect()
    }

    pub(super) fn holds_active_claim(task: &Task, token: ClaimToken, now: DateTime<Utc>) -> bool {
        task.claim_token == Some(token)
            && match task.status {
                TaskStatus::Running => true,
                TaskStatus::Dispatched => task.lease_expires_at.is_some_and(|expiry| expiry >= now),
                _ => false,
            }
    }
}
