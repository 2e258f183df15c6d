//! The [`Worker`]: registers a runtime, heartbeats, claims tasks into free local slots (streamed
//! by default, long-poll when streaming is unavailable) and hands each to [`task_run`].
//!
//! Slots are taken **before** claiming: a credit granted on the stream, or a `max_tasks` asked
//! of `ClaimTask`, always stands for a slot the worker already holds, so it never claims work it
//! cannot run at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};

use super::backoff::Backoff;
use super::handler::Handler;
use super::{Client, error_reason, task_run};
use crate::proto as pb;
use crate::proto::stream_claims_request::Msg as Outbound;
use crate::proto::stream_claims_response::Msg as Inbound;

/// The most tasks one `ClaimTask` may ask for (spec §3.2).
const MAX_TASKS_PER_CLAIM: usize = 32;

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

    pub fn shutdown_grace(mut self, grace: Duration) -> WorkerConfig {
        self.shutdown_grace = grace;
        self
    }
}

/// What the server told the runtime when it registered.
#[derive(Clone, Debug)]
struct Registration {
    runtime_id: String,
    heartbeat_interval: Duration,
    lease_duration: Duration,
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
    registrar: Client,
    /// The runtime's own token from its latest registration; every runtime call uses it.
    runtime_client: RwLock<Option<Client>>,
    /// Fired when the server revoked the runtime token: another daemon registered this name.
    revoked: CancellationToken,
    pub(super) config: WorkerConfig,
    pub(super) handler: Arc<dyn Handler>,
    /// Fires when shutdown's grace has run out: in-flight handlers are cancelled.
    pub(super) abort: CancellationToken,
    /// Which claim path delivered tasks: cancellations are polled for only in unary mode.
    pub(super) streaming: AtomicBool,
    registration: RwLock<Option<Registration>>,
    in_flight: Mutex<HashMap<String, Tracked>>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
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

    fn registration(&self) -> Option<Registration> {
        self.registration
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn runtime_id(&self) -> String {
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
    fn cancel(&self, task_id: &str) {
        if let Some(tracked) = self.lock_in_flight().get(task_id) {
            tracked.by_server.store(true, Ordering::SeqCst);
            tracked.cancelled.cancel();
        }
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

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

/// Registers, retrying transient failures with backoff. `Ok(false)`: shutdown came first.
async fn register_until_done(
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<bool, Status> {
    let (base, max) = shared.config.reconnect_backoff;
    let mut backoff = Backoff::new(base, max);
    loop {
        match register(shared).await {
            Ok(()) => return Ok(true),
            Err(status) if super::is_transient(&status) => {
                tracing::warn!(error = %status.message(), "cannot register yet; retrying");
            }
            Err(status) => return Err(status),
        }
        if !sleep_unless(shutdown, backoff.next_delay()).await {
            return Ok(false);
        }
    }
}

async fn register(shared: &Shared) -> Result<(), Status> {
    let config = &shared.config;
    let response = shared
        .registrar
        .worker()
        .register_runtime(pb::RegisterRuntimeRequest {
            name: config.name.clone(),
            queues: config.queues.clone(),
            labels: config.labels.clone(),
            max_concurrency: config.concurrency,
        })
        .await?
        .into_inner();
    let runtime_id = response
        .runtime
        .map(|runtime| runtime.id)
        .unwrap_or_default();
    // Empty when the server runs `--auth none`: the registrar's connection serves then.
    let runtime_client = match response.runtime_token.as_str() {
        "" => None,
        token => Some(
            shared
                .registrar
                .with_token(token)
                .map_err(|error| Status::internal(error.to_string()))?,
        ),
    };
    *shared
        .runtime_client
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = runtime_client;
    let registration = Registration {
        heartbeat_interval: std_duration(response.heartbeat_interval, Duration::from_secs(15)),
        lease_duration: std_duration(response.lease_duration, Duration::from_secs(60)),
        runtime_id,
    };
    tracing::info!(runtime_id = %registration.runtime_id, name = %config.name, "registered");
    *shared
        .registration
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(registration);
    Ok(())
}

fn std_duration(duration: Option<prost_types::Duration>, default: Duration) -> Duration {
    duration
        .and_then(|duration| Duration::try_from(duration).ok())
        .filter(|duration| !duration.is_zero())
        .unwrap_or(default)
}

/// Once per process start: whatever the runtime held in an earlier life is lost; fail it now
/// (retried per policy) instead of waiting for offline detection.
async fn recover_orphans(shared: &Shared) {
    let request = pb::RecoverOrphansRequest {
        runtime_id: shared.runtime_id(),
    };
    match shared.client().worker().recover_orphans(request).await {
        Ok(response) => {
            let response = response.into_inner();
            if response.failed > 0 {
                tracing::warn!(
                    failed = response.failed,
                    retried = response.retried,
                    "recovered tasks held by this runtime before it restarted"
                );
            }
        }
        Err(status) => tracing::warn!(error = %status.message(), "RecoverOrphans failed"),
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared
            .registration()
            .map_or(Duration::from_secs(15), |registration| {
                registration.heartbeat_interval
            });
        if !sleep_unless(&stop, interval).await {
            return;
        }
        let request = pb::HeartbeatRequest {
            runtime_id: shared.runtime_id(),
        };
        match shared.client().worker().heartbeat(request).await {
            Ok(_) => {}
            Err(status) if is_runtime_not_found(&status) => reregister(&shared).await,
            Err(status) if super::is_revoked(&status) => {
                shared.notice_revocation(&status);
                return;
            }
            Err(status) => tracing::warn!(error = %status.message(), "heartbeat failed"),
        }
    }
}

fn is_runtime_not_found(status: &Status) -> bool {
    error_reason(status).as_deref() == Some("RUNTIME_NOT_FOUND")
}

/// The server no longer knows this runtime (its store was reset): register again, by name.
async fn reregister(shared: &Shared) {
    tracing::warn!("the server does not know this runtime; registering again");
    if let Err(status) = register(shared).await {
        tracing::warn!(error = %status.message(), "re-registering failed");
    }
}

/// Claims until `shutdown`, reconnecting with backoff.
async fn claim_loop(shared: &Arc<Shared>, shutdown: &CancellationToken) {
    let (base, max) = shared.config.reconnect_backoff;
    let mut backoff = Backoff::new(base, max);
    while !shutdown.is_cancelled() {
        let streaming = shared.streaming.load(Ordering::SeqCst);
        let outcome = if streaming {
            stream_session(shared, shutdown, &mut backoff).await
        } else {
            unary_claim(shared, shutdown, &mut backoff).await
        };
        let Err(status) = outcome else { continue };
        if streaming && status.code() == Code::Unimplemented {
            tracing::warn!("the server does not stream claims; falling back to long-poll");
            shared.streaming.store(false, Ordering::SeqCst);
        } else if is_runtime_not_found(&status) {
            reregister(shared).await;
        } else if super::is_revoked(&status) {
            shared.notice_revocation(&status);
            return;
        } else {
            let delay = backoff.next_delay();
            tracing::warn!(error = %status.message(), ?delay, "claiming failed; reconnecting");
            sleep_unless(shutdown, delay).await;
        }
    }
}

/// Waits for one free slot (or shutdown), then takes every other free slot up to `most`.
async fn reserve_slots(
    shared: &Shared,
    shutdown: &CancellationToken,
    most: usize,
) -> Option<Vec<OwnedSemaphorePermit>> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return None,
        permit = shared.slots.clone().acquire_owned() => permit.ok()?,
    };
    let mut reserved = vec![first];
    reserved.extend(free_slots(shared, most - 1));
    Some(reserved)
}

/// Takes the slots free right now, `most` at the most.
fn free_slots(shared: &Shared, most: usize) -> Vec<OwnedSemaphorePermit> {
    let mut taken = Vec::new();
    while taken.len() < most {
        match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => taken.push(permit),
            Err(_) => break,
        }
    }
    taken
}

/// One `StreamClaims` session: credits track reserved slots one to one. Returns `Ok` when the
/// session ended on purpose (shutdown, or the server draining), `Err` when it broke.
async fn stream_session(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Status> {
    // Opened even when every slot is busy (zero credits): the stream also carries the
    // cancellations of the tasks those slots are running.
    let mut reserved = free_slots(shared, usize::MAX);
    let (outbound, requests) = mpsc::channel(16);
    let open = pb::OpenStream {
        runtime_id: shared.runtime_id(),
        credits: reserved.len() as u32,
    };
    let _ = outbound.send(outbound_message(Outbound::Open(open))).await;
    let mut worker = shared.client().worker();
    let mut inbound = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        opened = worker.stream_claims(ReceiverStream::new(requests)) => {
            opened?.into_inner()
        }
    };
    backoff.reset();
    let idle_timeout = shared.config.stream_idle_timeout;
    loop {
        // Dropping `outbound` on return ends the stream; the server then gives back every
        // pushed claim not yet started (T4').
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            message = tokio::time::timeout(idle_timeout, inbound.message()) => {
                let message = message
                    .map_err(|_| Status::unavailable("the claim stream went silent"))??
                    .and_then(|response| response.msg)
                    .ok_or_else(|| Status::unavailable("the server closed the claim stream"))?;
                match message {
                    Inbound::Claimed(claimed) => match reserved.pop() {
                        Some(slot) => spawn_task(shared, claimed, slot),
                        // The server broke the credit contract; the lease will lapse and the
                        // task return to the queue.
                        None => tracing::error!("claim pushed without a credit; ignored"),
                    },
                    Inbound::Cancelled(cancelled) => shared.cancel(&cancelled.task_id),
                    Inbound::Keepalive(_) => {}
                    Inbound::Draining(_) => {
                        tracing::info!("the server is draining; reconnecting");
                        return Ok(());
                    }
                }
            }
            slot = shared.slots.clone().acquire_owned() => {
                let Ok(slot) = slot else { return Ok(()) };
                reserved.push(slot);
                let credit = Outbound::Credit(pb::GrantCredit { n: 1 });
                if outbound.send(outbound_message(credit)).await.is_err() {
                    return Err(Status::unavailable("the claim stream closed"));
                }
            }
        }
    }
}

fn outbound_message(msg: Outbound) -> pb::StreamClaimsRequest {
    pb::StreamClaimsRequest { msg: Some(msg) }
}

/// One long-poll `ClaimTask` for as many tasks as there are free slots.
async fn unary_claim(
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> Result<(), Status> {
    let Some(mut reserved) = reserve_slots(shared, shutdown, MAX_TASKS_PER_CLAIM).await else {
        return Ok(());
    };
    let wait = shared.config.long_poll_wait;
    let mut request = tonic::Request::new(pb::ClaimTaskRequest {
        runtime_id: shared.runtime_id(),
        max_tasks: Some(reserved.len() as u32),
        wait: prost_types::Duration::try_from(wait).ok(),
    });
    request.set_timeout(wait + Duration::from_secs(5));
    let mut worker = shared.client().worker();
    let claimed = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        response = worker.claim_task(request) => response?.into_inner().tasks,
    };
    backoff.reset();
    for task in claimed {
        if let Some(slot) = reserved.pop() {
            spawn_task(shared, task, slot);
        }
    }
    Ok(())
}

fn spawn_task(shared: &Arc<Shared>, claimed: pb::ClaimedTask, slot: OwnedSemaphorePermit) {
    shared
        .tasks
        .spawn(task_run::process(shared.clone(), claimed, slot));
}

/// Lets in-flight tasks finish within the grace period, then cancels the rest and waits for
/// their final reports.
async fn drain_in_flight(shared: &Shared) {
    shared.tasks.close();
    let grace = shared.config.shutdown_grace;
    if tokio::time::timeout(grace, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            still_running = shared.tasks.len(),
            "shutdown grace over; cancelling in-flight tasks"
        );
        shared.abort.cancel();
        shared.tasks.wait().await;
    }
}

async fn deregister(shared: &Shared) {
    let request = pb::DeregisterRuntimeRequest {
        runtime_id: shared.runtime_id(),
    };
    match shared.client().worker().deregister_runtime(request).await {
        Ok(response) => tracing::info!(requeued = response.into_inner().requeued, "deregistered"),
        Err(status) => tracing::warn!(error = %status.message(), "DeregisterRuntime failed"),
    }
}

/// Sleeps for `duration`; `false` when `stop` fired first.
pub(super) async fn sleep_unless(stop: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}
