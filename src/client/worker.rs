//! The [`Worker`]: registers a runtime, heartbeats (`lifecycle.rs`), claims tasks into free local
//! slots, streamed by default, long-poll when streaming is unavailable (`claiming.rs`), and hands
//! each to `task_run.rs`. What they share is in `shared.rs`; the settings in `worker_config.rs`.
//!
//! Slots are taken **before** claiming: a credit granted on the stream, or a `max_tasks` asked
//! of `ClaimTask`, always stands for a slot the worker already holds, so it never claims work it
//! cannot run at once.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;

use super::Client;
use super::claiming::{claim_loop, drain_in_flight};
use super::handler::Handler;
use super::lifecycle::{deregister, heartbeat_loop, recover_orphans, register_until_done};
use super::shared::Shared;
use super::worker_config::{ClaimMode, WorkerConfig};

/// A worker daemon's engine: see the module documentation.
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(client: Client, config: WorkerConfig, handler: impl Handler) -> Worker {
        let slots = Arc::new(Semaphore::new(config.concurrency.max(1) as usize));
        Worker {
            shared: Arc::new(Shared {
                registrar: client,
                runtime_client: RwLock::new(None),
                revoked: CancellationToken::new(),
                handler: Arc::new(handler),
                abort: CancellationToken::new(),
                streaming: AtomicBool::new(config.claim_mode == ClaimMode::Stream),
                registration: RwLock::new(None),
                in_flight: Mutex::new(HashMap::new()),
                slots,
                tasks: TaskTracker::new(),
                stream_writer: RwLock::new(None),
                config,
            }),
        }
    }

    /// Runs until `shutdown` fires, then stops claiming, lets in-flight tasks finish within the
    /// grace period, and deregisters. Fails only if the runtime could never register.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Status> {
        let shared = self.shared;
        if !register_until_done(&shared, &shutdown).await? {
            return Ok(());
        }
        recover_orphans(&shared).await;

        // Heartbeats go on while in-flight tasks finish, so the runtime stays ONLINE.
        let stop_heartbeats = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(shared.clone(), stop_heartbeats.clone()));

        // Claiming stops at shutdown, or when another daemon took this runtime's name.
        let stop_claiming = shutdown.child_token();
        let revoked = shared.revoked.clone();
        let stop_on_revocation = stop_claiming.clone();
        tokio::spawn(async move {
            revoked.cancelled().await;
            stop_on_revocation.cancel();
        });
        claim_loop(&shared, &stop_claiming).await;
        drain_in_flight(&shared).await;

        stop_heartbeats.cancel();
        let _ = heartbeats.await;
        deregister(&shared).await;
        Ok(())
    }
}
