//! The liveness rule (spec §6, docs/semantics.md): a runtime is marked OFFLINE only after
//! `--offline-after` without any accepted call of its own, and then within one sweep. Real
//! PostgreSQL and Redis, short configured durations; the sweeps that judge are run explicitly
//! at chosen moments unless a test is about the background sweeper.

use std::net::ToSocketAddrs;
use std::time::Duration;

use leasehold::config::Config;
use leasehold::proto as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::time::Instant;

use crate::harness::{Backend, TestServer, status_of, task_id};
use crate::proxy::CuttableProxy;
use crate::redis::{redis_url, wait_until_redis_is_used, with_redis};

/// The same margin the server adds to `--offline-after` for a sign of life to reach a record
/// (`Liveness::record_lag`: 100ms of recording interval + the Redis timeout of `with_redis`).
const RECORD_LAG: Duration = Duration::from_millis(300);

/// The second configuration: `--offline-after 4s --heartbeat-interval 1s
/// --liveness-ttl 3s`, with Redis.
fn short_liveness(config: &mut Config) {
    with_redis(redis_url())(config);
    config.offline_after = Duration::from_secs(4);
    config.heartbeat_interval = Duration::from_secs(1);
    config.liveness_ttl = Duration::from_secs(3);
}

async fn sleep_until(deadline: Instant) {
    tokio::time::sleep_until(deadline).await;
}

/// A runtime holding one RUNNING task.
async fn running_task(server: &TestServer, name: &str) -> (String, pb::ClaimedTask) {
    let runtime = server.register(name, &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    (runtime, claimed)
}

async fn assert_still_running(server: &TestServer, runtime: &str, claimed: &pb::ClaimedTask) {
    assert_eq!(
        server.runtime_status(runtime).await,
        pb::RuntimeStatus::Online
    );
    let task = server.get_task(task_id(claimed)).await;
    assert_eq!(status_of(&task), pb::TaskStatus::Running);
}

/// Case 1 of the issue: the last heartbeat only reached Redis (PostgreSQL's `last_seen_at` is
/// older), and the runtime falls silent. Sweeps up to just before `--offline-after` leave it
/// alone; the first sweep after it (plus the recording margin) marks it.
#[sqlx::test]
async fn silence_right_after_a_redis_only_beat_is_not_offline_before_offline_after(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start_with(pool, connect, short_liveness).await;
    wait_until_redis_is_used(&server).await;
    let (runtime, claimed) = running_task(&server, "quiet").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Within the flush interval (4s / 3) of the registration: Redis only.
    server.heartbeat(&runtime).await;
    let last_call = Instant::now();

    while last_call.elapsed() < Duration::from_millis(3700) {
        let report = server.sweep().await;
        assert!(
            report.marked_offline.is_empty(),
            "marked OFFLINE {:?} after its last heartbeat",
            last_call.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_still_running(&server, &runtime, &claimed).await;
    server.complete(&claimed, b"done").await.unwrap();

    // The other side: silent for longer than the threshold, it is detected by one sweep.
    let completed = Instant::now();
    sleep_until(completed + Duration::from_secs(4) + RECORD_LAG + Duration::from_millis(200)).await;
    let report = server.sweep().await;
    assert_eq!(report.marked_offline.len(), 1);
    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Offline
    );
}

/// Case 2 of the issue: PostgreSQL goes away for less than `--offline-after` while Redis stays
/// up. Heartbeats keep succeeding on Redis alone, and the first sweep after the database
/// returns fails nothing.
#[sqlx::test]
async fn a_database_outage_shorter_than_offline_after_fails_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let upstream = (connect.get_host(), connect.get_port())
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let proxy = CuttableProxy::start(upstream).await;
    let connect = connect.host("127.0.0.1").port(proxy.address.port());
    let server = TestServer::start_with(pool, connect, |config| {
        short_liveness(config);
        config.liveness_ttl = Duration::from_secs(2);
    })
    .await;
    wait_until_redis_is_used(&server).await;
    let (runtime, claimed) = running_task(&server, "patient").await;
    let registered = Instant::now();
    server.heartbeat(&runtime).await;

    proxy.cut();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let beat = server
            .worker
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                runtime_id: runtime.clone(),
            })
            .await;
        assert!(beat.is_ok(), "a heartbeat Redis recorded failed: {beat:?}");
    }
    proxy.restore();

    // Past the threshold since the last write to `last_seen_at`: only Redis knows it lives.
    sleep_until(registered + Duration::from_secs(4) + RECORD_LAG + Duration::from_millis(300))
        .await;
    let report = sweep_once_the_database_answers(&server).await;
    assert!(report.marked_offline.is_empty());
    assert!(report.runtime_offline.is_empty());
    assert_still_running(&server, &runtime, &claimed).await;
    server.complete(&claimed, b"done").await.unwrap();
}

async fn sweep_once_the_database_answers(server: &TestServer) -> leasehold::store::SweepReport {
    for _ in 0..50 {
        if let Ok(Some(report)) = server.coordinator.sweep(None).await {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sweep never ran after the database came back");
}

/// Case 3 of the issue, and the rule for every call: a runtime that never heartbeats but keeps
/// claiming, starting and completing stays ONLINE, and none of its work is failed.
async fn a_runtime_that_only_claims_and_completes_stays_online(backend: Backend) {
    only_claims_and_completes(backend, |_| {}).await;
}

async fn only_claims_and_completes(backend: Backend, configure: impl FnOnce(&mut Config)) {
    let server = backend
        .start_with(|config| {
            configure(config);
            config.offline_after = Duration::from_millis(1500);
            config.sweep_interval = Duration::from_millis(200);
        })
        .await;
    if server.coordinator.redis().is_some() {
        wait_until_redis_is_used(&server).await;
    }
    let runtime = server.register("busy", &["q"]).await;
    let until = Instant::now() + Duration::from_secs(4);
    let mut completed = 0;
    while Instant::now() < until {
        server.enqueue_to("q").await;
        let claimed = server.claim_one(&runtime).await;
        server.start_task(&claimed).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        server
            .complete(&claimed, b"done")
            .await
            .expect("the owner's completion is accepted");
        completed += 1;
    }
    assert!(completed >= 8);
    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Online
    );
}

/// Case 3 of the issue: a claim by an OFFLINE runtime brings it back ONLINE first, so the next
/// sweep does not fail what it just claimed.
async fn a_claim_by_an_offline_runtime_brings_it_back_and_its_claim_survives(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("returning", &["q"]).await;
    server.advance_time(Duration::from_secs(151)).await;
    assert_eq!(server.sweep().await.marked_offline.len(), 1);
    server.enqueue_to("q").await;

    let claimed = server.claim_one(&runtime).await;

    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Online
    );
    let report = server.sweep().await;
    assert!(report.marked_offline.is_empty() && report.runtime_offline.is_empty());
    server.start_task(&claimed).await.unwrap();
    server.complete(&claimed, b"done").await.unwrap();
}

/// A stream open is a claim too: an OFFLINE runtime that opens one (even with no credits)
/// is ONLINE again.
async fn a_stream_open_by_an_offline_runtime_brings_it_back(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("streaming", &["q"]).await;
    server.advance_time(Duration::from_secs(151)).await;
    assert_eq!(server.sweep().await.marked_offline.len(), 1);

    let _stream = crate::streams::ClaimStream::open(&server, &runtime, 0).await;

    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Online
    );
}

/// Time during which no sweep could run does not count against runtimes: a runtime last
/// seen before the gap is judged as if the gap had not happened.
async fn a_gap_in_sweeping_is_not_counted_against_runtimes(backend: Backend) {
    let server = backend
        .start_with(|config| config.sweep_interval = Duration::from_secs(10))
        .await;
    let runtime = server.register("stranded", &["q"]).await;
    server.sweep().await;

    // Ten minutes pass in which no sweep runs (the database was unreachable, say).
    server.advance_time(Duration::from_secs(600)).await;
    let report = server.sweep().await;

    assert!(report.marked_offline.is_empty());
    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Online
    );
    // Silent for the threshold after the gap, with sweeps at their interval, it is marked.
    let mut marked = Vec::new();
    for _ in 0..16 {
        server.advance_time(Duration::from_secs(10)).await;
        marked.extend(server.sweep().await.marked_offline);
    }
    assert_eq!(marked.len(), 1);
}

conformance!(
    a_runtime_that_only_claims_and_completes_stays_online,
    a_claim_by_an_offline_runtime_brings_it_back_and_its_claim_survives,
    a_stream_open_by_an_offline_runtime_brings_it_back,
    a_gap_in_sweeping_is_not_counted_against_runtimes,
);

/// The same rule with Redis: signs of life reach Redis, not PostgreSQL, on the calls' path.
#[sqlx::test]
async fn with_redis_a_runtime_that_only_claims_and_completes_stays_online(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let backend = Backend::Postgres(Box::new((pool, connect)));
    only_claims_and_completes(backend, with_redis(redis_url())).await;
}

/// The background sweeper marks a silent runtime no sooner than the threshold and no later
/// than a sweep interval (plus scheduling slack) after it.
#[sqlx::test]
async fn a_silent_runtime_is_marked_within_one_sweep_interval(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start_with(pool, connect, |config| {
        with_redis(redis_url())(config);
        config.offline_after = Duration::from_secs(1);
        config.sweep_interval = Duration::from_millis(300);
    })
    .await;
    wait_until_redis_is_used(&server).await;
    let (runtime, _claimed) = running_task(&server, "vanishing").await;
    let last_call = Instant::now();

    let marked_after = loop {
        if server.runtime_status(&runtime).await == pb::RuntimeStatus::Offline {
            break last_call.elapsed();
        }
        assert!(
            last_call.elapsed() < Duration::from_secs(10),
            "never marked"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    assert!(
        marked_after >= Duration::from_secs(1),
        "marked after {marked_after:?}"
    );
    let latest = Duration::from_secs(1) + RECORD_LAG + Duration::from_millis(300 * 2 + 500);
    assert!(marked_after <= latest, "marked after {marked_after:?}");
}

/// Heartbeats have connections of their own: with every request connection taken, a
/// heartbeat still reaches PostgreSQL.
#[sqlx::test]
async fn heartbeats_do_not_wait_for_request_connections(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let runtime = server.register("steady", &["q"]).await;
    let mut held = Vec::new();
    while let Ok(Ok(connection)) =
        tokio::time::timeout(Duration::from_millis(500), server.pool().acquire()).await
    {
        held.push(connection);
    }
    assert!(!held.is_empty());

    let beat = tokio::time::timeout(Duration::from_secs(3), server.heartbeat(&runtime)).await;

    assert!(
        beat.is_ok(),
        "the heartbeat waited for a request connection"
    );
    let report = tokio::time::timeout(Duration::from_secs(3), server.sweep()).await;
    assert!(report.is_ok(), "the sweep waited for a request connection");
}
