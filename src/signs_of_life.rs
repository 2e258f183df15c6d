//! Every accepted call of a runtime is a sign of life (spec §6). Calls only note the runtime
//! here, in memory, at no cost on their path; every [`RECORD_INTERVAL`] the runtimes noted
//! since are recorded together in Redis (one script call). PostgreSQL is not written for them
//! while Redis takes them, so idle claims and streams cost it nothing: heartbeats keep
//! `last_seen_at` within the flush interval, and the sweeper copies Redis's time into a stale
//! `last_seen_at` of a runtime Redis saw. When Redis cannot take them, PostgreSQL takes them
//! all (one statement on the liveness connections).

use std::collections::HashSet;
use std::sync::Mutex;

use tokio_util::sync::CancellationToken;

use crate::advisory::Liveness;
use crate::advisory::liveness::RECORD_INTERVAL;
use crate::domain::RuntimeId;
use crate::store::TaskStore;
use crate::telemetry::metrics::Metrics;

pub struct SignsOfLife {
    /// Runtimes heard from since the last recording.
    noted: Mutex<HashSet<RuntimeId>>,
    metrics: Metrics,
}

impl SignsOfLife {
    pub fn new(metrics: Metrics) -> SignsOfLife {
        SignsOfLife {
            noted: Mutex::default(),
            metrics,
        }
    }

    pub fn note(&self, runtime: RuntimeId) {
        self.lock().insert(runtime);
    }

    fn take(&self) -> Vec<RuntimeId> {
        self.lock().drain().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<RuntimeId>> {
        self.noted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what was noted every [`RECORD_INTERVAL`] until `stop`, then once more.
    pub async fn run(&self, liveness: &Liveness, store: &dyn TaskStore, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(RECORD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.record(liveness, store).await;
        }
        self.record(liveness, store).await;
    }

    /// Records what was noted so far.
    pub async fn record(&self, liveness: &Liveness, store: &dyn TaskStore) {
        let runtimes = self.take();
        if runtimes.is_empty() {
            return;
        }
        self.metrics.signs_of_life(runtimes.len());
        if liveness.record(&runtimes).await.is_some() {
            return;
        }
        match store.touch_runtimes(&runtimes).await {
            Ok(written) => liveness.flushed(&written).await,
            Err(error) => {
                self.metrics.liveness_write_failed();
                tracing::warn!(%error, runtimes = runtimes.len(), "cannot write last_seen_at");
            }
        }
    }
}
