//! What the worker's loops and every task it runs share: the runtime's credentials and
//! registration, the free slots, the tasks in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::Client;
use super::handler::Handler;
use super::stream_writer::StreamWriter;
use super::worker_config::WorkerConfig;

/// What the server told the runtime when it registered.
#[derive(Clone, Debug)]
pub(super) struct Registration {
    pub(super) runtime_id: String,
    pub(super) heartbeat_interval: Duration,
    pub(super) lease_duration: Duration,
}

/// A task being processed, so that a cancellation can reach its handler.
#[derive(Clone)]
pub(super) struct Tracked {
    pub(super) cancelled: CancellationToken,
    /// Set when the server cancelled the task (rather than the worker shutting down).
    pub(super) by_server: Arc<AtomicBool>,
}

/// State the claim loop, the heartbeat loop and every task share.
pub(super) struct Shared {
    /// The credential the runtime registers with (an API key with `register`, or none).
    pub(super) registrar: Client,
    /// The runtime's own token from its latest registration; every runtime call uses it.
    pub(super) runtime_client: RwLock<Option<Client>>,
    /// Fired when the server revoked the runtime token: another daemon registered this name.
    pub(super) revoked: CancellationToken,
    pub(super) config: WorkerConfig,
    pub(super) handler: Arc<dyn Handler>,
    /// Fires when shutdown's grace has run out: in-flight handlers are cancelled.
    pub(super) abort: CancellationToken,
    /// Which claim path delivered tasks: cancellations are polled for only in unary mode.
    pub(super) streaming: AtomicBool,
    pub(super) registration: RwLock<Option<Registration>>,
    pub(super) in_flight: Mutex<HashMap<String, Tracked>>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) tasks: TaskTracker,
    /// The open claim stream's writer, when finished tasks are reported on it.
    pub(super) stream_writer: RwLock<Option<Arc<StreamWriter>>>,
}

impl Shared {
    /// The client for this runtime's calls: with its runtime token once it has one.
    pub(super) fn client(&self) -> Client {
        self.runtime_client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| self.registrar.clone())
    }

    /// Stops claiming if the server says this runtime's token was revoked.
    pub(super) fn notice_revocation(&self, status: &Status) {
        if super::is_revoked(status) && !self.revoked.is_cancelled() {
            tracing::error!(
                name = %self.config.name,
                "this runtime's token was revoked: another daemon registered the name {:?} \
                 and now holds it; this daemon stops claiming",
                self.config.name
            );
            self.revoked.cancel();
        }
    }

    /// The open claim stream's writer, if reports go on the stream.
    pub(super) fn stream_writer(&self) -> Option<Arc<StreamWriter>> {
        self.stream_writer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_stream_writer(&self, writer: Option<Arc<StreamWriter>>) {
        *self
            .stream_writer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = writer;
    }

    pub(super) fn registration(&self) -> Option<Registration> {
        self.registration
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn runtime_id(&self) -> String {
        self.registration()
            .map(|registration| registration.runtime_id)
            .unwrap_or_default()
    }

    pub(super) fn lease_duration(&self) -> Duration {
        self.registration()
            .map_or(Duration::from_secs(60), |registration| {
                registration.lease_duration
            })
    }

    pub(super) fn track(&self, task_id: &str) -> Tracked {
        let tracked = Tracked {
            cancelled: self.abort.child_token(),
            by_server: Arc::new(AtomicBool::new(false)),
        };
        self.lock_in_flight()
            .insert(task_id.to_owned(), tracked.clone());
        tracked
    }

    pub(super) fn untrack(&self, task_id: &str) {
        self.lock_in_flight().remove(task_id);
    }

    /// The server cancelled `task_id`: its handler is told through its token.
    pub(super) fn cancel(&self, task_id: &str) {
        if let Some(tracked) = self.lock_in_flight().get(task_id) {
            tracked.by_server.store(true, Ordering::SeqCst);
            tracked.cancelled.cancel();
        }
    }

    pub(super) fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sleeps for `duration`; `false` when `stop` fired first.
pub(super) async fn sleep_unless(stop: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}
