//! The faults a soak injects, and when.

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use rand::RngExt;
use rand::rngs::StdRng;

use super::history::HistoryLog;
use super::{Load, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// kill -9 a replica, restart it.
    ReplicaKill,
    /// SIGTERM a replica (drain), restart it.
    ReplicaTerm,
    /// kill -9 Redis, restart it empty.
    RedisRestart,
    /// A fast shutdown and start of PostgreSQL.
    PostgresRestart,
    /// kill -9 a worker mid-task; a replacement starts under a new name.
    WorkerKill,
    /// In the proxies, continuously: resets, delays, lost responses.
    Network,
}

pub(super) const ALL_FAULTS: [Fault; 6] = [
    Fault::ReplicaKill,
    Fault::ReplicaTerm,
    Fault::RedisRestart,
    Fault::PostgresRestart,
    Fault::WorkerKill,
    Fault::Network,
];

/// When each fault happens: every enabled kind at least once (PostgreSQL twice), then more at
/// random, spread over the fault window.
pub(super) fn schedule(
    faults: &[Fault],
    window: Duration,
    rng: &mut StdRng,
) -> Vec<(Duration, Fault)> {
    let discrete: Vec<Fault> = faults
        .iter()
        .copied()
        .filter(|fault| *fault != Fault::Network)
        .collect();
    if discrete.is_empty() {
        return Vec::new();
    }
    let mut kinds = discrete.clone();
    if discrete.contains(&Fault::PostgresRestart) {
        kinds.push(Fault::PostgresRestart);
    }
    let extra = (window.as_secs() / 8).saturating_sub(kinds.len() as u64);
    for _ in 0..extra {
        kinds.push(discrete[rng.random_range(0..discrete.len())]);
    }
    // Evenly spaced slots with jitter, so two restarts never pile onto one moment.
    let slot = window.div_f64(kinds.len() as f64 + 1.0);
    let mut order: Vec<usize> = (0..kinds.len()).collect();
    for index in (1..order.len()).rev() {
        order.swap(index, rng.random_range(0..=index));
    }
    order
        .into_iter()
        .enumerate()
        .map(|(position, kind)| {
            let jitter: f64 = rng.random_range(-0.3..0.3);
            (slot.mul_f64(position as f64 + 1.0 + jitter), kinds[kind])
        })
        .collect()
}

pub(super) async fn inject(
    fault: Fault,
    topology: &mut Topology<'_>,
    load: &mut Load,
    channels: &[tonic::transport::Channel],
    history: &Arc<HistoryLog>,
    dir: &std::path::Path,
    rng: &mut StdRng,
) -> anyhow::Result<()> {
    tracing::info!(?fault, "injecting");
    match fault {
        Fault::ReplicaKill => {
            let replica = &mut topology.replicas[rng.random_range(0..2)];
            replica.kill().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            replica.start()
        }
        Fault::ReplicaTerm => {
            let replica = &mut topology.replicas[rng.random_range(0..2)];
            replica.terminate(Duration::from_secs(10)).await;
            replica.start()
        }
        Fault::RedisRestart => topology.redis.kill_and_restart().await,
        Fault::PostgresRestart => topology.postgres.restart().await,
        Fault::WorkerKill => {
            // A daemon (a real kill -9) or one of our own workers, replaced under a new name.
            if rng.random_bool(0.5) && !load.daemons.is_empty() {
                let mut daemon = load.daemons.remove(rng.random_range(0..load.daemons.len()));
                tracing::info!(daemon = %daemon.name, "kill -9");
                daemon.kill().await;
                load.start_daemon(topology, dir)
            } else {
                let worker = load.sdk.remove(rng.random_range(0..load.sdk.len()));
                tracing::info!(worker = %worker.name, "killed");
                worker.kill();
                load.start_sdk_worker(channels, history, rng);
                Ok(())
            }
        }
        Fault::Network => Ok(()),
    }
}
