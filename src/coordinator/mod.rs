//! The service layer: every RPC's rules that depend on configuration (batch caps, lease
//! clamps, size limits, defaults), in front of the store. The one place that combines the
//! store with liveness, the empty-claim cache and wake-ups: after every change that commits,
//! the topics it touched are announced ([`Coordinator::announce`]): their cache versions are
//! bumped, then waiters here and on other replicas are woken.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::advisory::{Cancellation, ClaimCache, Liveness, RedisLink, WakeRelay};
use crate::auth::{AuthMode, Authenticator};
use crate::domain::auth::{ApiKey, Grant, Principal, Secret, TokenText};
use crate::domain::{
    ClaimToken, ClaimedTask, Error, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task,
    TaskId, TaskStatus, validate,
};
use crate::signs_of_life::SignsOfLife;
use crate::store::measured::MeasuredStore;
use crate::store::{
    Capacity, ClaimRequest, Enqueued, FailOutcome, Failure, HeartbeatAck, NewApiKey, NewRuntime,
    NewTask, PageCursor, QueueUpdate, Recovered, SweepPolicy, SweepReport, TaskFilter, TaskMove,
    TaskPage, TaskStore,
};
use crate::wakeups::{DueWakeups, Notifier, Subscription, Topic, Wakes};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Most tasks one ClaimTask call hands out.
pub const MAX_CLAIM_BATCH: u32 = 32;
/// `max_attempts` when the producer leaves it at 0.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most tasks one EnqueueTasks call may carry.
pub const MAX_ENQUEUE_BATCH: usize = 1000;
/// Longest a ClaimTask waits for work (`wait`).
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);
/// A long-polling claim gives up this long before the caller's deadline, so its empty answer
/// arrives in time.
const DEADLINE_MARGIN: Duration = Duration::from_millis(50);
/// Most counters one ReportUsage call may carry.
pub const MAX_USAGE_COUNTERS: usize = 256;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub lease_duration: Duration,
    pub heartbeat_interval: Duration,
    /// Limit for payloads, results and error texts alike.
    pub max_payload_bytes: usize,
    pub liveness_ttl: Duration,
    pub sweep: SweepPolicy,
    /// How often an idle claim stream hears a keepalive.
    pub stream_keepalive: Duration,
    /// The fallback re-check of waiting claims (streams and long-polls) when no wake-up came.
    pub stream_poll_interval: Duration,
    /// See `--stream-claim-linger`.
    pub stream_claim_linger: Duration,
    /// See `--max-streams-per-runtime`.
    pub max_streams_per_runtime: usize,
}

/// What a runtime learns when it registers.
#[derive(Clone, Debug)]
pub struct Registration {
    pub runtime: Runtime,
    /// Shown once, in the registration's response.
    pub runtime_token: TokenText,
    pub heartbeat_interval: Duration,
    pub lease_duration: Duration,
}

pub struct Coordinator {
    store: Arc<dyn TaskStore>,
    settings: Settings,
    redis: Option<Arc<RedisLink>>,
    liveness: Liveness,
    /// Runtimes heard from since the last recording (see [`SignsOfLife`]).
    signs_of_life: SignsOfLife,
    claim_cache: Arc<ClaimCache>,
    notifier: Arc<Notifier>,
    due: DueWakeups,
    relay: WakeRelay,
    /// Queues whose depth gauges this replica has set.
    gauged_queues: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Cancelled when the server starts draining: claim streams say `draining` and end.
    draining: CancellationToken,
    authenticator: Authenticator,
    /// Claim streams open on this replica, per runtime.
    open_streams: Arc<std::sync::Mutex<std::collections::HashMap<RuntimeId, usize>>>,
}

/// One open claim stream of a runtime, counted until dropped.
pub struct StreamSlot {
    runtime: RuntimeId,
    open_streams: Arc<std::sync::Mutex<std::collections::HashMap<RuntimeId, usize>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.runtime) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.runtime);
            }
        }
    }
}

impl Coordinator {
    /// `redis`: the advisory link, when configured.
    pub fn new(
        store: Arc<dyn TaskStore>,
        settings: Settings,
        redis: Option<Arc<RedisLink>>,
        auth: (AuthMode, Option<PathBuf>),
    ) -> Self {
        let store: Arc<dyn TaskStore> = Arc::new(MeasuredStore::new(store));
        Self {
            authenticator: Authenticator::new(auth.0, store.clone(), redis.clone(), auth.1),
            open_streams: Arc::default(),
            liveness: Liveness::new(
                redis.clone(),
                settings.liveness_ttl,
                settings.sweep.offline_after,
            ),
            signs_of_life: SignsOfLife::default(),
            claim_cache: Arc::new(ClaimCache::new(redis.clone())),
            notifier: Notifier::new(),
            due: DueWakeups::default(),
            gauged_queues: std::sync::Mutex::default(),
            relay: WakeRelay::default(),
            draining: CancellationToken::new(),
            redis,
            store,
            settings,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn redis(&self) -> Option<&Arc<RedisLink>> {
        self.redis.as_ref()
    }

    pub async fn ready(&self) -> Result<()> {
        self.store.ping().await
    }

    /// The caller behind a bearer token (spec §9).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal> {
        self.authenticator.authenticate(bearer).await
    }

    /// Re-reads the admin token file when it changes, until `stop`.
    pub async fn watch_admin_token(&self, stop: CancellationToken) {
        self.authenticator.watch_admin_token(stop).await;
    }

    /// A credential was revoked or replaced here or on another replica: none verified before
    /// may be trusted from the cache.
    pub fn forget_credentials(&self) {
        self.authenticator.forget_everything();
    }

    /// Tells this replica and (through Redis) the others to forget verified credentials.
    async fn announce_revocation(&self) {
        self.authenticator.forget_everything();
        if let Some(redis) = &self.redis {
            redis.announce_revocation(&self.relay).await;
        }
    }

    pub async fn create_api_key(
        &self,
        name: String,
        grants: Vec<Grant>,
        expires_in: Option<Duration>,
    ) -> Result<(ApiKey, TokenText)> {
        validate::required_text("name", &name)?;
        if grants.is_empty() {
            return Err(Error::invalid(
                "scopes",
                "an API key needs at least one scope",
            ));
        }
        let (id, secret) = (uuid::Uuid::new_v4(), Secret::random());
        let key = self
            .store
            .create_api_key(NewApiKey {
                id,
                name,
                grants,
                digest: secret.digest(),
                expires_in,
            })
            .await?;
        tracing::info!(key_id = %key.id, name = %key.name, "API key created");
        Ok((key, TokenText::api_key(id, &secret)))
    }

    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        self.store.list_api_keys().await
    }

    pub async fn revoke_api_key(&self, key_id: uuid::Uuid) -> Result<ApiKey> {
        let key = self.store.revoke_api_key(key_id).await?;
        self.announce_revocation().await;
        tracing::info!(%key_id, "API key revoked");
        Ok(key)
    }

    pub async fn register_runtime(&self, mut runtime: NewRuntime) -> Result<Registration> {
        validate::required_text("name", &runtime.name)?;
        validate::string_map("labels", &runtime.labels)?;
        if runtime.queues.is_empty() || runtime.queues.len() > validate::MAX_RUNTIME_QUEUES {
            return Err(Error::invalid(
                "queues",
                format!(
                    "a runtime serves 1 to {} queues",
                    validate::MAX_RUNTIME_QUEUES
                ),
            ));
        }
        for queue in &runtime.queues {
            validate::queue_name("queues", queue)?;
        }
        runtime.queues.sort();
        runtime.queues.dedup();
        let secret = Secret::random();
        let runtime = self
            .store
            .register_runtime(runtime, secret.digest())
            .await?;
        // The previous token of this name is revoked: no replica may trust it from its cache.
        self.announce_revocation().await;
        let runtime_token = TokenText::runtime(runtime.id, &secret);
        self.liveness.flushed(&[runtime.id]).await;
        self.claim_cache.learn_queues(runtime.id, &runtime.queues);
        // Its queues may have changed: no verdict computed for the old ones may stand.
        self.announce_topics(Wakes::all([Topic::Runtime(runtime.id)]), &[])
            .await;
        tracing::info!(runtime_id = %runtime.id, name = %runtime.name, "runtime registered");
        Ok(Registration {
            runtime,
            runtime_token,
            heartbeat_interval: self.settings.heartbeat_interval,
            lease_duration: self.settings.lease_duration,
        })
    }

    /// Redis takes the beat; PostgreSQL's `last_seen_at` is written too when it is due (or
    /// without Redis). The beat succeeds while either store could record it: an unreachable
    /// database does not fail a runtime whose beat Redis holds.
    pub async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        let recorded = self.liveness.record(&[runtime_id]).await;
        let redis_only = HeartbeatAck {
            server_time: Utc::now(),
            status: RuntimeStatus::Online,
        };
        if recorded.as_deref() == Some(&[false]) {
            return Ok(redis_only);
        }
        match self.store.heartbeat(runtime_id).await {
            Ok(ack) => {
                self.liveness.flushed(&[runtime_id]).await;
                Ok(ack)
            }
            Err(Error::StoreUnavailable(error)) if recorded.is_some() => {
                tracing::warn!(%runtime_id, %error, "heartbeat recorded in Redis only");
                Ok(redis_only)
            }
            Err(error) => Err(error),
        }
    }

    /// A call of `runtime_id` was accepted: it is alive. Recorded off the call's path.
    pub fn note_sign_of_life(&self, runtime_id: RuntimeId) {
        self.signs_of_life.note(runtime_id);
    }

    /// Records the signs of life noted on this replica, until `stop`.
    pub async fn record_signs_of_life(&self, stop: CancellationToken) {
        self.signs_of_life
            .run(&self.liveness, self.store.as_ref(), stop)
            .await;
    }

    /// Records the signs of life noted so far now, rather than at the next interval.
    pub async fn flush_signs_of_life(&self) {
        self.signs_of_life
            .record(&self.liveness, self.store.as_ref())
            .await;
    }

    /// A slot for one more claim stream of `runtime_id` on this replica, or TOO_MANY_STREAMS.
    pub fn admit_stream(&self, runtime_id: RuntimeId) -> Result<StreamSlot> {
        let limit = self.settings.max_streams_per_runtime;
        let mut open = self
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(runtime_id).or_default();
        if *count >= limit {
            return Err(Error::TooManyStreams(limit));
        }
        *count += 1;
        Ok(StreamSlot {
            runtime: runtime_id,
            open_streams: self.open_streams.clone(),
        })
    }

    /// What a new claim stream may be granted: the runtime's free slots under its
    /// `max_concurrency` (spec §10).
    pub async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        self.store.runtime_capacity(runtime_id).await
    }

    /// A claim stream opened: a sign of life that, like a claim, brings an OFFLINE runtime
    /// back ONLINE (and runs the preflight).
    pub async fn stream_opened(&self, runtime_id: RuntimeId) -> Result<()> {
        self.claim(runtime_id, Some(0), None, CacheUse::Bypass)
            .await
            .map(drop)
    }

    /// Graceful exit: OFFLINE, unstarted claims requeued (T4''). Returns how many.
    pub async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<u32> {
        let requeued = self.store.deregister_runtime(runtime_id).await?;
        self.liveness.forget(runtime_id).await;
        self.announce(&requeued).await;
        tracing::info!(%runtime_id, requeued = requeued.len(), "runtime deregistered");
        Ok(u32::try_from(requeued.len()).unwrap_or(u32::MAX))
    }

    pub async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered> {
        let recovered = self.store.recover_orphans(runtime_id).await?;
        count_server_failures("RUNTIME_RECOVERY", &recovered.moved);
        self.announce(&recovered.moved).await;
        tracing::info!(
            %runtime_id,
            failed = recovered.failed(),
            retried = recovered.retried(),
            "orphans recovered"
        );
        Ok(recovered)
    }

    /// A page of runtimes by name after `after`, and whether more follow (the page's last
    /// name is then where the next starts). `page_size`: 0 = the default, capped.
    pub async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        page_size: u32,
    ) -> Result<(Vec<Runtime>, bool)> {
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let mut runtimes = self
            .store
            .list_runtimes(status, after, page_size + 1)
            .await?;
        let more = runtimes.len() > page_size as usize;
        runtimes.truncate(page_size as usize);
        Ok((runtimes, more))
    }

    /// Preflight requeue and claim. `max_tasks`: absent = 1, 0 = only the preflight, capped at
    /// [`MAX_CLAIM_BATCH`]. `budget` is the time left before the caller's deadline.
    ///
    /// With Redis, a runtime whose last claim found nothing, and for which nothing changed
    /// since, is answered from the empty-claim cache without touching PostgreSQL. Such a
    /// verdict never outlives the runtime's earliest lease, so the preflight it skips would
    /// have requeued nothing.
    pub async fn claim(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        budget: Option<Duration>,
        cache: CacheUse,
    ) -> Result<Vec<ClaimedTask>> {
        let max_tasks = max_tasks.unwrap_or(1).min(MAX_CLAIM_BATCH);
        let read_and_claim = async {
            let snapshot = if max_tasks > 0 && cache == CacheUse::Read {
                self.claim_cache.snapshot(runtime_id).await
            } else {
                None
            };
            if snapshot
                .as_ref()
                .is_some_and(|snapshot| snapshot.says_empty())
            {
                return Ok((snapshot, None));
            }
            let request = ClaimRequest {
                runtime_id,
                max_tasks,
                budget,
            };
            Ok((snapshot, Some(self.store.claim(request).await?)))
        };
        let (snapshot, outcome) = read_and_claim.await?;
        self.note_sign_of_life(runtime_id);
        let Some(outcome) = outcome else {
            return Ok(Vec::new());
        };
        count_preflight(&outcome.preflight);
        metrics::counter!("leasehold_tasks_claimed_total").increment(outcome.claimed.len() as u64);
        self.announce_topics(Wakes::of_moves(&outcome.preflight), &[])
            .await;
        if !outcome.claimed.is_empty() && self.claim_cache.is_active() {
            // The runtime's horizon changed (a new lease of its own): any verdict read before
            // this claim must not be trusted. Nobody needs waking for it, and the claim need
            // not wait for it: a verdict is stored only with the versions read before its own
            // claim, so one read before this bump lands is replaced by it whenever it lands.
            let claim_cache = self.claim_cache.clone();
            tokio::spawn(async move { claim_cache.invalidate(runtime_id).await });
        }
        // A verdict needs the versions read before the claim, which a bypassing claim did not
        // read. (A first claim reads none either: its horizon teaches the cache the queues.)
        if outcome.claimed.is_empty()
            && max_tasks > 0
            && cache == CacheUse::Read
            && self.claim_cache.is_active()
        {
            let horizon = self.store.claim_horizon(runtime_id).await?;
            self.claim_cache
                .remember_empty(runtime_id, snapshot, &horizon)
                .await;
        }
        Ok(outcome.claimed)
    }

    /// ClaimTask with `wait`: claims at once, and when nothing is claimable waits (up to
    /// min(wait, 30s), ending before the caller's deadline) for a wake-up or the poll interval,
    /// then claims again.
    pub async fn claim_waiting(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        wait: Duration,
        budget: Option<Duration>,
    ) -> Result<Vec<ClaimedTask>> {
        let wait = budget.map_or(wait, |budget| {
            wait.min(budget.saturating_sub(DEADLINE_MARGIN))
        });
        let wait = wait.min(MAX_CLAIM_WAIT);
        if wait.is_zero() || max_tasks == Some(0) {
            return self
                .claim(runtime_id, max_tasks, budget, CacheUse::Read)
                .await;
        }
        let started = tokio::time::Instant::now();
        let until = started + wait;
        // Subscribed before the first claim, so a change committed after it wakes us.
        let subscription = self.subscribe(runtime_id).await?;
        let mut cache = CacheUse::Read;
        loop {
            let budget_left = budget.map(|budget| budget.saturating_sub(started.elapsed()));
            let claimed = self
                .claim(runtime_id, max_tasks, budget_left, cache)
                .await?;
            if !claimed.is_empty() || tokio::time::Instant::now() >= until {
                return Ok(claimed);
            }
            let recheck =
                tokio::time::Instant::now() + jittered(self.settings.stream_poll_interval);
            tokio::select! {
                () = subscription.woken() => cache = CacheUse::Bypass,
                () = tokio::time::sleep_until(recheck.min(until)) => cache = CacheUse::Read,
                // Shutting down: answer now rather than hold the drain.
                () = self.draining.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Wake-ups for what `runtime_id` can claim: its queues and its pin set.
    pub async fn subscribe(&self, runtime_id: RuntimeId) -> Result<Subscription> {
        let queues = match self.claim_cache.known_queues(runtime_id) {
            Some(queues) => queues.to_vec(),
            None => {
                let horizon = self.store.claim_horizon(runtime_id).await?;
                self.claim_cache.learn_queues(runtime_id, &horizon.queues);
                horizon.queues
            }
        };
        let mut topics: Vec<Topic> = queues.into_iter().map(Topic::Queue).collect();
        topics.push(Topic::Runtime(runtime_id));
        Ok(self.notifier.subscribe(topics))
    }

    /// Cancellations of the tasks `runtime_id` holds, for one claim stream.
    pub fn hold_cancellations(&self, runtime_id: RuntimeId) -> mpsc::Receiver<TaskId> {
        self.notifier.hold(runtime_id)
    }

    /// T4': a claim stream ended; the claims pushed on it that were not started go back to
    /// QUEUED at once. Returns how many.
    pub async fn expire_stream_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<usize> {
        if claims.is_empty() {
            return Ok(0);
        }
        let expired = self.store.expire_claims(runtime_id, claims).await?;
        for moved in &expired {
            let cause = match moved.status {
                TaskStatus::Failed => "poison",
                _ => "stream_break",
            };
            metrics::counter!("leasehold_lease_expiries_total", "cause" => cause).increment(1);
        }
        self.announce(&expired).await;
        Ok(expired.len())
    }

    /// Delivers other replicas' wake-ups and cancellations here until `stop`.
    pub async fn relay_wakeups(&self, redis: Arc<RedisLink>, stop: CancellationToken) {
        let forget = || self.authenticator.forget_everything();
        self.relay
            .run(redis, self.notifier.clone(), &forget, stop)
            .await;
    }

    /// Cancelled when the server begins draining.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Gives up the sweep's leadership at shutdown (a failure only delays the next leader
    /// until the lease runs out).
    pub async fn step_down(&self) {
        if let Err(error) = self.store.step_down().await {
            tracing::warn!(%error, "could not give up the sweep's leadership");
        }
    }

    /// One sweep (spec §6); `None` when another replica is sweeping.
    pub async fn sweep(&self, due_since: Option<DateTime<Utc>>) -> Result<Option<SweepReport>> {
        let report = self
            .store
            .sweep(&self.settings.sweep, &self.liveness, due_since)
            .await?;
        if let Some(report) = &report {
            count_server_failures("RUNTIME_OFFLINE", &report.runtime_offline);
            count_server_failures("TIMEOUT", &report.timed_out);
            count_server_failures("RUNTIME_GONE", &report.runtime_gone);
            self.announce(report.moves()).await;
            self.refresh_queue_gauges().await;
        }
        Ok(report)
    }

    /// Queue depth gauges, refreshed by the sweeping replica only (one query per sweep, not
    /// one per scrape). Queues that emptied are set to zero.
    async fn refresh_queue_gauges(&self) {
        let depths = match self.store.queue_depths().await {
            Ok(depths) => depths,
            Err(error) => {
                tracing::warn!(%error, "cannot read queue depths");
                return;
            }
        };
        let mut reported = self
            .gauged_queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let emptied: Vec<String> = reported
            .iter()
            .filter(|queue| !depths.iter().any(|depth| &depth.queue == *queue))
            .cloned()
            .collect();
        for queue in emptied {
            set_queue_gauges(&queue, 0, 0, 0, None);
            reported.remove(&queue);
        }
        for depth in depths {
            set_queue_gauges(
                &depth.queue,
                depth.queued,
                depth.dispatched,
                depth.running,
                depth.oldest_queued_age,
            );
            reported.insert(depth.queue);
        }
    }

    /// Tells everyone that these tasks moved. Call after the change committed. A task that
    /// becomes claimable only later (delay, retry backoff) is announced again then.
    async fn announce<'a>(&self, moves: impl IntoIterator<Item = &'a TaskMove>) {
        let now = Utc::now();
        let mut wakes = Wakes::default();
        for moved in moves {
            if moved.status == TaskStatus::Queued
                && let Ok(later) = (moved.available_at - now).to_std()
                && !later.is_zero()
            {
                // Versions change now; waiters are woken when it comes due.
                for topic in Topic::for_move(moved) {
                    wakes.add(topic, 0);
                }
                self.due.schedule(later, moved);
            } else {
                wakes.add_move(moved);
            }
        }
        self.announce_topics(wakes, &[]).await;
    }

    /// Announces delayed tasks as they come due, until `stop`.
    pub async fn announce_due_tasks(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                wakes = self.due.next_due() => self.announce_topics(wakes, &[]).await,
            }
        }
    }

    /// Bumps the versions of the topics (Redis), then wakes their waiters (as many as `wakes`
    /// says) and pushes `cancellations`, on this replica and (through Redis) on the others.
    ///
    /// The versions change before anyone is woken (spec §6), so no waiter can find the
    /// verdict that the change made stale still standing. (A woken waiter claims with
    /// [`CacheUse::Bypass`] anyway: the bump may have failed with Redis out of reach.)
    async fn announce_topics(&self, wakes: Wakes, cancellations: &[Cancellation]) {
        if let Some(redis) = &self.redis {
            redis.announce(&self.relay, &wakes, cancellations).await;
        }
        self.notifier.wake(&wakes);
        for cancellation in cancellations {
            self.notifier
                .cancelled(cancellation.runtime, cancellation.task);
        }
    }

    async fn announce_task(&self, task: &Task) {
        self.announce([&TaskMove::from(task)]).await;
    }

    /// `acting` on every owner write: the runtime whose own token made the call (spec §9).
    pub async fn start(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        let task = self.store.start(task_id, token, acting).await?;
        self.note_holder_alive(&task);
        metrics::counter!("leasehold_task_starts_total").increment(1);
        Ok(task)
    }

    /// `extend_by`: absent or zero = the lease duration, which is also its maximum.
    pub async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Option<Duration>,
        acting: Option<RuntimeId>,
    ) -> Result<DateTime<Utc>> {
        let lease = self.settings.lease_duration;
        let extend_by = extend_by
            .filter(|extend_by| !extend_by.is_zero())
            .map_or(lease, |extend_by| extend_by.min(lease));
        let renewal = self
            .store
            .extend_lease(task_id, token, extend_by, acting)
            .await?;
        if let Some(runtime_id) = renewal.runtime_id {
            self.note_sign_of_life(runtime_id);
        }
        Ok(renewal.lease_expires_at)
    }

    /// A token-fenced write succeeded: the runtime holding the task made it.
    fn note_holder_alive(&self, task: &Task) {
        if let Some(runtime_id) = task.claimed_by {
            self.note_sign_of_life(runtime_id);
        }
    }

    pub async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        validate::payload_size("result", &result, self.settings.max_payload_bytes)?;
        let task = self.store.complete(task_id, token, result, acting).await?;
        self.note_holder_alive(&task);
        metrics::counter!("leasehold_task_completions_total").increment(1);
        self.announce_task(&task).await;
        Ok(task)
    }

    pub async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        error: String,
        retryable: bool,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome> {
        // Never refused for its content: a refusal would strand the task RUNNING (spec §10).
        let failure = Failure {
            error: validate::failure_text(&error, self.settings.max_payload_bytes),
            retryable,
            jitter: rand::random::<f64>(),
        };
        let outcome = self.store.fail(task_id, token, failure, acting).await?;
        self.note_holder_alive(&outcome.task);
        count_failure("TASK_ERROR", outcome.will_retry);
        self.announce_task(&outcome.task).await;
        Ok(outcome)
    }

    pub async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<()> {
        if counters.len() > MAX_USAGE_COUNTERS {
            return Err(Error::invalid(
                "counters",
                format!("at most {MAX_USAGE_COUNTERS} counters per report"),
            ));
        }
        for name in counters.keys() {
            validate::required_text("counters", name)?;
        }
        if let Some(runtime_id) = self
            .store
            .report_usage(task_id, token, counters, acting)
            .await?
        {
            self.note_sign_of_life(runtime_id);
        }
        Ok(())
    }

    pub async fn task_status(
        &self,
        task_id: TaskId,
        acting: Option<RuntimeId>,
    ) -> Result<(TaskStatus, u32)> {
        self.store.task_status(task_id, acting).await
    }

    /// Validates a task to enqueue and fills its defaults.
    fn prepare(&self, mut task: NewTask) -> Result<NewTask> {
        validate::queue_name("queue", &task.queue)?;
        validate::payload_size("payload", &task.payload, self.settings.max_payload_bytes)?;
        validate::string_map("metadata", &task.metadata)?;
        validate::duration("delay", task.delay)?;
        if let Some(timeout) = task.execution_timeout {
            validate::duration("execution_timeout", timeout)?;
        }
        if task.max_attempts == 0 {
            task.max_attempts = DEFAULT_MAX_ATTEMPTS;
        }
        Ok(task)
    }

    pub async fn enqueue(&self, task: NewTask) -> Result<Enqueued> {
        let task = self.prepare(task)?;
        let enqueued = self.store.enqueue(task).await?;
        if !enqueued.deduplicated {
            self.announce_task(&enqueued.task).await;
        }
        tracing::debug!(task_id = %enqueued.task.id, deduplicated = enqueued.deduplicated, "enqueued");
        Ok(enqueued)
    }

    /// EnqueueTasks: the valid items are stored in one atomic change; every item gets its own
    /// result, in order (an item that failed to parse arrives as its error).
    pub async fn enqueue_batch(
        &self,
        items: Vec<Result<NewTask>>,
    ) -> Result<Vec<Result<Enqueued>>> {
        if items.len() > MAX_ENQUEUE_BATCH {
            return Err(Error::invalid(
                "requests",
                format!("at most {MAX_ENQUEUE_BATCH} tasks per call"),
            ));
        }
        let mut results: Vec<Option<Result<Enqueued>>> = Vec::with_capacity(items.len());
        let mut valid = Vec::new();
        for item in items {
            match item.and_then(|task| self.prepare(task)) {
                Ok(task) => {
                    valid.push(task);
                    results.push(None);
                }
                Err(error) => results.push(Some(Err(error))),
            }
        }
        let mut stored = self.store.enqueue_batch(valid).await?.into_iter();
        let results: Vec<Result<Enqueued>> = results
            .into_iter()
            .map(|result| {
                result.or_else(|| stored.next()).unwrap_or_else(|| {
                    Err(Error::Internal(
                        "the store answered fewer results than tasks".into(),
                    ))
                })
            })
            .collect();
        let fresh: Vec<TaskMove> = results
            .iter()
            .filter_map(|result| result.as_ref().ok())
            .filter(|enqueued| !enqueued.deduplicated)
            .map(|enqueued| TaskMove::from(&enqueued.task))
            .collect();
        self.announce(&fresh).await;
        Ok(results)
    }

    pub async fn get_task(&self, task_id: TaskId) -> Result<Task> {
        self.store.get_task(task_id).await
    }

    /// `page_size`: 0 = the default; above the maximum it is capped.
    pub async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage> {
        if let Some(queue) = &filter.queue {
            validate::queue_name("queue", queue)?;
        }
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        self.store.list_tasks(filter, after, page_size).await
    }

    /// A cancelled task that was held (it still carries its claim's token) is pushed as
    /// `cancelled` to its runtime's claim streams.
    pub async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        let task = self.store.cancel(task_id).await?;
        let cancellation = match (task.status, task.claim_token, task.claimed_by) {
            (TaskStatus::Cancelled, Some(_), Some(runtime)) => Some(Cancellation {
                runtime,
                task: task.id,
            }),
            _ => None,
        };
        let wakes = Wakes::of_moves([&TaskMove::from(&task)]);
        self.announce_topics(wakes, cancellation.as_slice()).await;
        Ok(task)
    }

    /// Redrive (T9).
    pub async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        let task = self.store.retry_task(task_id).await?;
        self.announce_task(&task).await;
        tracing::info!(%task_id, "task redriven");
        Ok(task)
    }

    pub async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        self.store.describe_queue(queue).await
    }

    pub async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        validate::queue_name("queue", queue)?;
        if let Some(Some(timeout)) = update.default_execution_timeout {
            validate::duration("default_execution_timeout", timeout)?;
        }
        let info = self.store.update_queue(queue, update).await?;
        // Its cap or pause changed: any waiter may be able to claim now.
        self.announce_topics(Wakes::all([Topic::Queue(queue.to_owned())]), &[])
            .await;
        Ok(info)
    }
}

/// `interval` ± 20%, so waiters that started together do not re-check together.
/// Whether a claim may be answered from the empty-claim cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheUse {
    /// A poll: a verdict still valid answers it without PostgreSQL.
    Read,
    /// After a wake-up: something changed, so ask PostgreSQL at once (the versions that say
    /// so may not have reached Redis, if it was out of reach). Stores no verdict.
    Bypass,
}

pub fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

fn count_preflight(moves: &[TaskMove]) {
    for moved in moves {
        let cause = if moved.status == TaskStatus::Failed {
            "poison"
        } else {
            "preflight"
        };
        metrics::counter!("leasehold_lease_expiries_total", "cause" => cause).increment(1);
    }
}

fn count_failure(reason: &'static str, retried: bool) {
    metrics::counter!("leasehold_task_failures_total", "reason" => reason).increment(1);
    if retried {
        metrics::counter!("leasehold_task_retries_total", "reason" => reason).increment(1);
    }
}

fn count_server_failures(reason: &'static str, moves: &[TaskMove]) {
    for moved in moves {
        count_failure(reason, moved.status == TaskStatus::Queued);
    }
}

fn set_queue_gauges(
    queue: &str,
    queued: u64,
    dispatched: u64,
    running: u64,
    oldest_queued_age: Option<Duration>,
) {
    for (status, count) in [
        ("QUEUED", queued),
        ("DISPATCHED", dispatched),
        ("RUNNING", running),
    ] {
        metrics::gauge!("leasehold_queue_tasks", "queue" => queue.to_owned(), "status" => status)
            .set(count as f64);
    }
    metrics::gauge!("leasehold_queue_oldest_queued_age_seconds", "queue" => queue.to_owned())
        .set(oldest_queued_age.map_or(0.0, |age| age.as_secs_f64()));
}
