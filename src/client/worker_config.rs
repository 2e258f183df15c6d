//! How a [`super::Worker`] behaves: claim mode, concurrency, intervals and grace periods.

use std::collections::HashMap;
use std::time::Duration;

/// How claims reach the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimMode {
    /// `StreamClaims` with credits; falls back to `Unary` when the server does not implement it.
    Stream,
    /// `ClaimTask` long-polls; cancellations are found by polling `GetTaskStatus`.
    Unary,
}

/// How a [`Worker`] behaves. `new` gives the defaults; fields are public for the rest.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Runtime name: registration is an upsert by name, so a restarted daemon with the same name
    /// is the same runtime (and `RecoverOrphans` at start fails what its previous life held).
    /// Two live daemons must never share a name.
    pub name: String,
    pub queues: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Tasks run at once (local slots).
    pub concurrency: u32,
    pub claim_mode: ClaimMode,
    /// Streamed claims arrive started (StreamClaims' `auto_start`): no `StartTask` per task, one
    /// write fewer. The handler's `prepare` then runs on a RUNNING task, without a lease to
    /// keep. Off by default; unary claims are always started with `StartTask`.
    pub auto_start: bool,
    /// While a claim stream is open, finished tasks are reported on it (`StreamWrite`) instead
    /// of by `CompleteTask` / `FailTask` calls: no call per task. Off by default, because a
    /// server older than the stream's writes ends a stream that carries one; turn it on once
    /// every server runs this release.
    pub writes_on_stream: bool,
    /// How long shutdown lets in-flight tasks finish before cancelling them.
    pub shutdown_grace: Duration,
    /// `wait` of each long-poll `ClaimTask` in unary mode.
    pub long_poll_wait: Duration,
    /// How often a running task's status is polled for cancellation in unary mode.
    pub cancel_poll_interval: Duration,
    /// A claim stream silent for this long (no claim, no keepalive) is treated as broken.
    pub stream_idle_timeout: Duration,
    /// How long a usage report keeps being retried, and after how long a final report
    /// (`CompleteTask`/`FailTask`) that is still being retried is logged as an error. A final
    /// report itself is retried while the process lives (spec §10), independent of shutdown,
    /// so a finished task's outcome is not lost because the server or the worker is slow.
    pub report_deadline: Duration,
    /// Pause before the one retry of a `StartTask` whose answer was lost.
    pub start_retry_pause: Duration,
    /// First and largest delay between reconnect attempts (jittered, doubling).
    pub reconnect_backoff: (Duration, Duration),
}

impl WorkerConfig {
    pub fn new<Q: Into<String>>(
        name: impl Into<String>,
        queues: impl IntoIterator<Item = Q>,
    ) -> WorkerConfig {
        WorkerConfig {
            name: name.into(),
            queues: queues.into_iter().map(Into::into).collect(),
            labels: HashMap::new(),
            concurrency: 1,
            claim_mode: ClaimMode::Stream,
            auto_start: false,
            writes_on_stream: false,
            shutdown_grace: Duration::from_secs(30),
            long_poll_wait: Duration::from_secs(20),
            cancel_poll_interval: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(60),
            report_deadline: Duration::from_secs(60),
            start_retry_pause: Duration::from_millis(250),
            reconnect_backoff: (Duration::from_millis(100), Duration::from_secs(10)),
        }
    }

    pub fn concurrency(mut self, concurrency: u32) -> WorkerConfig {
        self.concurrency = concurrency.max(1);
        self
    }

    pub fn claim_mode(mut self, mode: ClaimMode) -> WorkerConfig {
        self.claim_mode = mode;
        self
    }

    pub fn auto_start(mut self, auto_start: bool) -> WorkerConfig {
        self.auto_start = auto_start;
        self
    }

    pub fn writes_on_stream(mut self, writes_on_stream: bool) -> WorkerConfig {
        self.writes_on_stream = writes_on_stream;
        self
    }

    pub fn shutdown_grace(mut self, grace: Duration) -> WorkerConfig {
        self.shutdown_grace = grace;
        self
    }
}
