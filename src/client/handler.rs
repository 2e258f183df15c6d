//! What a worker runs per task: the [`Handler`] trait, the [`TaskContext`] it sees and the
//! [`TaskError`] it returns.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::proto as pb;

/// The application's work. The worker calls `prepare` while the task is still DISPATCHED
/// (extending the lease meanwhile), then `StartTask`, then `run`; what `run` returns becomes
/// `CompleteTask` (`Ok`) or `FailTask` (`Err`).
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Work before the task counts as started: fetching inputs, waiting for a GPU. A failure
    /// here fails the task without starting it.
    async fn prepare(&self, _task: &TaskContext) -> Result<(), TaskError> {
        Ok(())
    }

    /// The task itself. Should watch [`TaskContext::cancelled`] and return soon after it fires.
    async fn run(&self, task: &TaskContext) -> Result<Vec<u8>, TaskError>;
}

/// One claimed task as its handler sees it.
pub struct TaskContext {
    task: pb::Task,
    cancelled: CancellationToken,
    usage: Mutex<HashMap<String, i64>>,
}

impl TaskContext {
    pub(crate) fn new(task: pb::Task, cancelled: CancellationToken) -> TaskContext {
        TaskContext {
            task,
            cancelled,
            usage: Mutex::new(HashMap::new()),
        }
    }

    /// The task as claimed (payload, metadata, attempt, …).
    pub fn task(&self) -> &pb::Task {
        &self.task
    }

    /// Fires when the task was cancelled, its claim was lost, or the worker is shutting down
    /// past its grace period. The handler should stop soon after; its result is then ignored.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancelled
    }

    /// Sets a usage counter (CPU seconds, tokens, bytes…). The worker reports all counters once,
    /// after the handler returns and before the task's final report, whatever the outcome.
    pub fn record_usage(&self, counter: impl Into<String>, value: i64) {
        self.lock_usage().insert(counter.into(), value);
    }

    pub(crate) fn take_usage(&self) -> HashMap<String, i64> {
        std::mem::take(&mut *self.lock_usage())
    }

    fn lock_usage(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        // A handler that panicked while holding the lock left a map that is still a map.
        self.usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a task failed, and whether another attempt could succeed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskError {
    pub message: String,
    pub retryable: bool,
}

impl TaskError {
    /// A failure another attempt may not repeat (a timeout, a flaky dependency).
    pub fn retryable(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure every attempt would repeat (bad input): no retry.
    pub fn permanent(message: impl Into<String>) -> TaskError {
        TaskError {
            message: message.into(),
            retryable: false,
        }
    }
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}
