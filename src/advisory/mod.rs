//! Redis: advisory state that makes leasehold cheap and fast, never state it relies on for
//! correctness (spec §6). It holds runtime liveness ([`liveness`]) and the versioned
//! empty-claim cache ([`claim_cache`]).
//!
//! Every call has a short timeout. The first failure marks the link *degraded*: from then on
//! calls are skipped outright (so a dead Redis costs no latency) and every caller falls back
//! to PostgreSQL, until a background probe reaches Redis again. Each transition is logged
//! once. Recovering starts a new cache epoch, which invalidates every verdict stored before:
//! version bumps may have been lost while Redis was out of reach.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, RedisResult};
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::Metrics;
use crate::wakeups::Wakes;

pub mod claim_cache;
pub mod liveness;
pub mod relay;

pub use claim_cache::ClaimCache;
pub use liveness::Liveness;
pub use relay::{Cancellation, WakeRelay};

/// How often a degraded link tries Redis again.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Version keys and the epoch live this long without a bump; a missing version reads as a
/// mismatch, so expiring one is always safe.
const VERSION_TTL: Duration = Duration::from_secs(24 * 60 * 60);

pub struct RedisLink {
    /// For the pub/sub subscription, which needs a connection of its own.
    client: redis::Client,
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    healthy: AtomicBool,
    metrics: Metrics,
}

impl RedisLink {
    /// Connects lazily: the server starts (degraded) even when Redis is down.
    pub fn new(
        url: &str,
        prefix: &str,
        timeout: Duration,
        metrics: Metrics,
    ) -> anyhow::Result<RedisLink> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(RedisLink {
            connection: ConnectionManager::new_lazy_with_config(client.clone(), config)?,
            client,
            prefix: prefix.to_owned(),
            timeout,
            // Not yet: the first probe starts an epoch, then the link is used.
            healthy: AtomicBool::new(false),
            metrics,
        })
    }

    fn client(&self) -> &redis::Client {
        &self.client
    }

    /// After a change committed: replaces the versions of the topics it touched, then
    /// publishes them (and cancellations) to the other replicas, in that order and in one
    /// round trip.
    pub async fn announce(&self, relay: &WakeRelay, wakes: &Wakes, cancellations: &[Cancellation]) {
        if wakes.is_empty() && cancellations.is_empty() {
            return;
        }
        let mut pipeline = redis::pipe();
        claim_cache::add_bumps(self, &mut pipeline, wakes.topics());
        relay.add_publish(self, &mut pipeline, wakes, cancellations);
        self.query_pipeline(pipeline).await;
    }

    /// Tells the other replicas that a credential was revoked or replaced.
    pub async fn announce_revocation(&self, relay: &WakeRelay) {
        let mut pipeline = redis::pipe();
        relay.add_revocation(self, &mut pipeline);
        self.query_pipeline(pipeline).await;
    }

    /// Sends a pipeline whose answers are ignored.
    async fn query_pipeline(&self, pipeline: redis::Pipeline) {
        self.call(
            |mut connection| async move { pipeline.query_async::<()>(&mut connection).await },
        )
        .await;
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// `{prefix}:{rest}`.
    fn key(&self, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}:{rest}", self.prefix)
    }

    fn epoch_key(&self) -> String {
        self.key(format_args!("epoch"))
    }

    /// Runs `command` unless the link is degraded; `None` when skipped or failed (which
    /// degrades the link).
    async fn call<T, F, Fut>(&self, command: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if !self.is_healthy() {
            return None;
        }
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.timeout, command(self.connection.clone())).await;
        self.metrics.redis_call(started.elapsed());
        match outcome {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.degrade(&error);
                None
            }
            Err(_elapsed) => {
                self.degrade(&format!("no answer within {:?}", self.timeout));
                None
            }
        }
    }

    /// Sends one command.
    async fn query<T: FromRedisValue>(&self, command: redis::Cmd) -> Option<T> {
        self.call(|mut connection| async move { command.query_async(&mut connection).await })
            .await
    }

    fn degrade(&self, cause: &dyn std::fmt::Display) {
        if self.healthy.swap(false, Ordering::AcqRel) {
            self.metrics.redis_degraded(true);
            tracing::warn!(
                %cause,
                "redis degraded: liveness, the claim cache and cross-replica wake-ups fall back \
                 to PostgreSQL until it answers again"
            );
        }
    }

    /// One probe: a fresh epoch, then the link is healthy.
    async fn probe(&self) -> RedisResult<()> {
        let epoch = random_version();
        let mut connection = self.connection.clone();
        let command = redis::cmd("SET")
            .arg(self.epoch_key())
            .arg(epoch)
            .arg("PX")
            .arg(millis(VERSION_TTL))
            .to_owned();
        match tokio::time::timeout(self.timeout, command.query_async::<()>(&mut connection)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "probe timed out",
            ))),
        }
    }

    /// Probes once, at start-up, so a healthy Redis is used from the first request.
    pub async fn connect_now(&self) {
        self.metrics.redis_degraded(true);
        if !self.recover().await {
            tracing::warn!(
                "redis unavailable at start-up; running on PostgreSQL alone until it answers"
            );
        }
    }

    /// Keeps probing while degraded, until `stop`.
    pub async fn watch(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
            }
            if !self.is_healthy() {
                self.recover().await;
            }
        }
    }

    async fn recover(&self) -> bool {
        match self.probe().await {
            Ok(()) => {
                self.healthy.store(true, Ordering::Release);
                self.metrics.redis_degraded(false);
                tracing::info!("redis available: using it for liveness and the claim cache");
                true
            }
            Err(error) => {
                tracing::debug!(%error, "redis still unavailable");
                false
            }
        }
    }
}

/// A fresh, unguessable version value. Random rather than counted: a counter that restarts
/// after its key was evicted could repeat a value an old verdict recorded.
fn random_version() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}
