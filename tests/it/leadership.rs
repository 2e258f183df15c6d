//! Sweeper leadership as a lease row (spec §6, §11): one replica sweeps while its lease lasts;
//! another takes over once it expired or was given up, and the epoch counts the handovers.

use std::time::Duration;

use leasehold::proto as pb;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::harness::{EVENTUALLY, TestServer, eventually};

/// (holder, epoch) of the sweep's lease.
async fn lease(pool: &PgPool) -> (uuid::Uuid, i64) {
    sqlx::query_as("SELECT holder, epoch FROM leadership WHERE role = 'sweeper'")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn leads(server: &TestServer) -> bool {
    server.coordinator.sweep(None).await.unwrap().is_some()
}

#[sqlx::test]
async fn one_replica_sweeps_until_its_lease_ends_or_it_steps_down(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let first = TestServer::start(pool.clone(), connect.clone()).await;
    let second = TestServer::start(pool, connect).await;

    assert!(leads(&first).await);
    assert!(!leads(&second).await, "the lease is held");
    assert!(leads(&first).await, "the holder renews");
    let (holder, epoch) = lease(first.pool()).await;
    assert_eq!(epoch, 1);

    // The holder stopped renewing (a crash): the lease runs out, the other replica takes over.
    sqlx::query("UPDATE leadership SET expires_at = now() - interval '1 second'")
        .execute(first.pool())
        .await
        .unwrap();
    assert!(leads(&second).await);
    assert!(!leads(&first).await);
    let (new_holder, epoch) = lease(first.pool()).await;
    assert_ne!(new_holder, holder);
    assert_eq!(epoch, 2);

    // A replica that shuts down gives the lease up at once.
    let pool = first.pool().clone();
    second.shutdown().await.unwrap();
    assert!(leads(&first).await);
    assert_eq!(lease(&pool).await, (holder, 3));
}

async fn runtime_status(server: &TestServer, runtime_id: &str) -> pb::RuntimeStatus {
    server.runtime_status(runtime_id).await
}

/// Two replicas with their background sweepers ticking every 100 ms: the silent runtime is
/// marked OFFLINE, and leadership never changed hands while both lived.
#[sqlx::test]
async fn two_replicas_sweep_with_one_steady_leader(pool: PgPoolOptions, connect: PgConnectOptions) {
    let configure = |config: &mut leasehold::config::Config| {
        config.sweep_interval = Duration::from_millis(100);
        config.offline_after = Duration::from_secs(1);
    };
    let first = TestServer::start_with(pool.clone(), connect.clone(), configure).await;
    let second = TestServer::start_with(pool, connect, configure).await;
    let silent = first.register("silent", &["q"]).await;
    eventually(
        "a replica marks the silent runtime OFFLINE",
        EVENTUALLY,
        async || {
            (runtime_status(&second, &silent).await == pb::RuntimeStatus::Offline).then_some(())
        },
    )
    .await;
    let (_, epoch) = lease(first.pool()).await;
    assert_eq!(epoch, 1, "leadership moved between two live replicas");
}
