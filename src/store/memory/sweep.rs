//! The sweeper's stages on the embedded store (spec §6): the same predicates as the SQL of
//! store/postgres/sweep.rs, over the in-memory state.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::*;

/// A failure the server decides on (sweeper, RecoverOrphans).
pub(super) struct ServerFailure {
    pub(super) reason: FailureReason,
    pub(super) error: &'static str,
}

impl ServerFailure {
    pub(super) const DISPATCH_TIMEOUT: ServerFailure = ServerFailure {
        reason: FailureReason::DispatchTimeout,
        error: "the task was dispatched but not started within the dispatch timeout",
    };
    pub(super) const EXECUTION_TIMEOUT: ServerFailure = ServerFailure {
        reason: FailureReason::ExecutionTimeout,
        error: "the task ran longer than its execution timeout",
    };
}

impl State {
    pub(super) fn mark_offline(&mut self, runtime_id: RuntimeId, now: DateTime<Utc>) -> Result<()> {
        let runtime = self
            .runtimes
            .get_mut(&runtime_id)
            .ok_or(Error::RuntimeNotFound(runtime_id))?;
        runtime.status = RuntimeStatus::Offline;
        self.offline_since.entry(runtime_id).or_insert(now);
        Ok(())
    }

    pub(super) fn stale_runtimes(&self, seen_before: DateTime<Utc>) -> Vec<RuntimeId> {
        self.runtimes
            .keys()
            .copied()
            .filter(|id| self.is_stale(*id, seen_before))
            .collect()
    }

    pub(super) fn is_stale(&self, runtime_id: RuntimeId, seen_before: DateTime<Utc>) -> bool {
        self.runtimes.get(&runtime_id).is_some_and(|runtime| {
            runtime.status == RuntimeStatus::Online && runtime.last_seen_at < seen_before
        })
    }

    /// Moves an ONLINE runtime's `last_seen_at` forward to `seen_at` (never back); false
    /// for an unknown or OFFLINE runtime.
    pub(super) fn refresh_last_seen(
        &mut self,
        runtime_id: RuntimeId,
        seen_at: DateTime<Utc>,
    ) -> bool {
        match self.runtimes.get_mut(&runtime_id) {
            Some(runtime) if runtime.status == RuntimeStatus::Online => {
                runtime.last_seen_at = runtime.last_seen_at.max(seen_at);
                true
            }
            _ => false,
        }
    }

    /// A heartbeat, or a claim by an OFFLINE runtime: seen now, and ONLINE.
    pub(super) fn revive(&mut self, runtime_id: RuntimeId, now: DateTime<Utc>) -> Result<()> {
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
    pub(super) fn mark_silent_runtimes_offline(
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
    pub(super) fn credit_blackout(&mut self, interval: Duration, now: DateTime<Utc>) {
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
    pub(super) fn fail_tasks_of_offline_runtimes(
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
    pub(super) fn fail_timed_out(
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
    pub(super) fn delete_finished(&mut self, finished_before: DateTime<Utc>) -> u64 {
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
        self.failures
            .retain(|task_id, _| !expired.contains(task_id));
        expired.len() as u64
    }

    /// Sweeper stage 4.
    pub(super) fn fail_pinned_orphans(
        &mut self,
        sweep: &SweepPolicy,
        now: DateTime<Utc>,
    ) -> Vec<TaskMove> {
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
    pub(super) fn became_available(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Vec<TaskMove> {
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
    pub(super) fn fail_for_server_reason(
        &mut self,
        task_id: TaskId,
        failure: &ServerFailure,
        policy: &StorePolicy,
        now: DateTime<Utc>,
    ) -> TaskMove {
        let cause = FailureCause {
            reason: failure.reason,
            error: failure.error.to_owned(),
            retryable: true,
            retried_claim_ends_as: ClaimEnd::Requeued,
        };
        self.apply_failure(task_id, cause, policy, rand::random::<f64>(), now);
        TaskMove::from(&*self.task_mut(task_id))
    }
}
