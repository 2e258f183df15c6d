//! Redis as advisory state (spec §6), against a real Redis: the empty-claim cache saves
//! PostgreSQL work and never hides a task, liveness keys outvote a stale `last_seen_at`, and
//! losing Redis costs nothing but the savings.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use leasehold::config::Config;
use leasehold::proto as pb;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{TestServer, status_of, task_id, task_in};

/// The Redis the test suite runs against (scripts/services.sh provides one).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Each test gets its own key prefix, so tests sharing one Redis never see each other.
pub fn with_redis(url: String) -> impl FnOnce(&mut Config) {
    move |config| {
        config.redis_url = Some(url);
        config.redis_key_prefix = format!("leasehold-test-{}", uuid::Uuid::new_v4());
        config.retry_backoff_base = Duration::ZERO;
        config.redis_timeout = Duration::from_millis(200);
    }
}

async fn start(pool: PgPoolOptions, connect: PgConnectOptions) -> TestServer {
    let server = TestServer::start_with(pool, connect, with_redis(redis_url())).await;
    wait_until_redis_is_used(&server).await;
    server
}

pub async fn wait_until_redis_is_used(server: &TestServer) {
    let redis = server.coordinator.redis().expect("redis configured");
    crate::harness::wait_until("the server uses Redis", || redis.is_healthy()).await;
}

async fn redis_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

fn key_prefix(server: &TestServer) -> String {
    server.coordinator.redis().unwrap().prefix().to_owned()
}

/// Whether Redis holds a "nothing claimable" verdict for this runtime.
async fn has_verdict(server: &TestServer, url: &str, runtime: &str) -> bool {
    let prefix = key_prefix(server);
    let mut connection = redis_connection(url).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(format!("{prefix}:empty:{runtime}"))
        .query_async(&mut connection)
        .await
        .unwrap();
    exists
}

/// Claims until the runtime's verdict is cached (the first empty claim may only teach the
/// server the runtime's queues).
async fn warm(server: &TestServer, url: &str, runtime: &str) {
    for _ in 0..3 {
        assert!(server.claim(runtime, Some(1)).await.is_empty());
        if has_verdict(server, url, runtime).await {
            return;
        }
    }
    panic!("no verdict was cached for an idle runtime");
}

/// Committed transactions of the test's database so far. Backends report their statistics
/// when idle, at most once a second, hence the pause.
async fn transactions(pool: &PgPool) -> i64 {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test]
async fn idle_claims_and_heartbeats_cost_postgres_almost_nothing(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = start(pool, connect).await;
    let url = redis_url();
    let runtime = server.register("idle", &["q", "other"]).await;
    warm(&server, &url, &runtime).await;

    let before = transactions(server.pool()).await;
    for _ in 0..300 {
        assert!(server.claim(&runtime, Some(4)).await.is_empty());
    }
    for _ in 0..100 {
        server.heartbeat(&runtime).await;
    }
    let after = transactions(server.pool()).await;

    // Two of these are the measurement's own statements.
    let per_call = (after - before) as f64 / 400.0;
    println!(
        "idle claims and heartbeats: {} transactions for 400 calls ({per_call:.4} per call)",
        after - before
    );
    assert!(per_call < 0.2, "{per_call} transactions per idle call");
}

#[sqlx::test]
async fn the_cache_never_hides_a_task(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = start(pool, connect).await;
    let url = redis_url();
    let observer = server.register("observer", &["q"]).await;
    let helper = server.register("helper", &["q"]).await;

    // An enqueue.
    warm(&server, &url, &observer).await;
    let enqueued = server.enqueue_to("q").await;
    let claimed = server.claim_one(&observer).await;
    assert_eq!(task_id(&claimed), enqueued.id);
    server.start_task(&claimed).await.unwrap();
    server.complete(&claimed, b"").await.unwrap();

    // A requeue after the helper's lease expired (its own preflight requeues it).
    server.enqueue_to("q").await;
    let held = server.claim_one(&helper).await;
    warm(&server, &url, &observer).await;
    server.let_leases_expire().await;
    assert!(server.claim(&helper, Some(0)).await.is_empty());
    let requeued = server.claim_one(&observer).await;
    assert_eq!(task_id(&requeued), task_id(&held));
    server.start_task(&requeued).await.unwrap();
    server.complete(&requeued, b"").await.unwrap();

    // A retry.
    server.enqueue_to("q").await;
    let failing = server.claim_one(&helper).await;
    warm(&server, &url, &observer).await;
    assert!(server.fail(&failing, true).await.unwrap().will_retry);
    let retried = server.claim_one(&observer).await;
    assert_eq!(task_id(&retried), task_id(&failing));
    server.start_task(&retried).await.unwrap();
    server.complete(&retried, b"").await.unwrap();

    // A cap raised.
    server.update_queue("q", Some(1), None).await;
    server.enqueue_to("q").await;
    let occupying = server.claim_one(&helper).await;
    let waiting = server.enqueue_to("q").await;
    warm(&server, &url, &observer).await;
    server.update_queue("q", Some(2), None).await;
    let uncapped = server.claim_one(&observer).await;
    assert_eq!(task_id(&uncapped), waiting.id);
    server.update_queue("q", Some(0), None).await;
    for claim in [&occupying, &uncapped] {
        server.start_task(claim).await.unwrap();
        server.complete(claim, b"").await.unwrap();
    }

    // A pause lifted.
    server.update_queue("q", None, Some(true)).await;
    let paused = server.enqueue_to("q").await;
    warm(&server, &url, &observer).await;
    server.update_queue("q", None, Some(false)).await;
    let resumed = server.claim_one(&observer).await;
    assert_eq!(task_id(&resumed), paused.id);
    server.start_task(&resumed).await.unwrap();
    server.complete(&resumed, b"").await.unwrap();

    // A delayed task coming due, which no write announces.
    let delayed = server
        .enqueue(pb::EnqueueTaskRequest {
            delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..task_in("q")
        })
        .await;
    warm(&server, &url, &observer).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let due = server.claim_one(&observer).await;
    assert_eq!(task_id(&due), delayed.id);

    // A task pinned to the observer.
    warm(&server, &url, &observer).await;
    let pinned = server
        .enqueue(pb::EnqueueTaskRequest {
            runtime_id: observer.clone(),
            ..task_in("q")
        })
        .await;
    let mine = server.claim_one(&observer).await;
    assert_eq!(task_id(&mine), pinned.id);
}

/// A cached verdict skips the claim's preflight, so it must end when the runtime's own
/// earliest lease does: the next claim then requeues the task and claims it again.
#[sqlx::test]
async fn a_verdict_never_outlives_the_runtimes_own_lease(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = redis_url();
    let server = TestServer::start_with(pool, connect, |config| {
        with_redis(url.clone())(config);
        config.lease_duration = Duration::from_millis(800);
    })
    .await;
    wait_until_redis_is_used(&server).await;
    let runtime = server.register("forgetful", &["q"]).await;
    server.enqueue_to("q").await;
    let first = server.claim_one(&runtime).await;
    warm(&server, &url, &runtime).await;

    tokio::time::sleep(Duration::from_millis(900)).await;
    let again = server.claim_one(&runtime).await;

    assert_eq!(task_id(&again), task_id(&first));
    assert_eq!(again.task.unwrap().lease_expirations, 1);
}

#[sqlx::test]
async fn a_live_key_outvotes_a_stale_last_seen_at(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = start(pool, connect).await;
    let url = redis_url();
    let beating = server.register("beating", &["q"]).await;
    let silent = server.register("silent", &["q"]).await;
    server.heartbeat(&beating).await;
    // The silent runtime's key expires (as its TTL would): only its stale row remains.
    let mut connection = redis_connection(&url).await;
    let prefix = key_prefix(&server);
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:live:{silent}"))
        .query_async(&mut connection)
        .await
        .unwrap();
    server.advance_time(Duration::from_secs(151)).await;

    // Redis only just started keeping records, so a missing one proves nothing yet:
    // `last_seen_at` may lag a Redis-only beat by the flush interval.
    let undecided = server.sweep().await;
    assert!(undecided.marked_offline.is_empty());
    // Once Redis has kept its data for longer than the threshold, it does.
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:live-epoch"))
        .arg(0)
        .query_async(&mut connection)
        .await
        .unwrap();
    let report = server.sweep().await;

    assert_eq!(
        report
            .marked_offline
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        std::slice::from_ref(&silent)
    );
    assert_eq!(
        server.runtime_status(&beating).await,
        pb::RuntimeStatus::Online
    );
    assert_eq!(
        server.runtime_status(&silent).await,
        pb::RuntimeStatus::Offline
    );
}

/// A private Redis on a free port, which the test may kill and restart.
struct PrivateRedis {
    port: u16,
    process: Option<Child>,
}

impl PrivateRedis {
    async fn start() -> PrivateRedis {
        let port = crate::harness::free_port();
        let mut redis = PrivateRedis {
            port,
            process: None,
        };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let process = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/services.sh installs it)");
        self.process = Some(process);
        for _ in 0..100 {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the private redis-server did not start");
    }

    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().unwrap();
            process.wait().unwrap();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One full lease cycle on a fresh task.
async fn lease_cycle(server: &TestServer, runtime: &str) {
    let task = server.enqueue_to("q").await;
    let claimed = server.claim_one(runtime).await;
    assert_eq!(task_id(&claimed), task.id);
    server.start_task(&claimed).await.unwrap();
    let done = server.complete(&claimed, b"ok").await.unwrap();
    assert_eq!(status_of(&done), pb::TaskStatus::Completed);
}

#[sqlx::test]
async fn losing_redis_keeps_everything_working_and_it_is_used_again_when_back(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let mut redis = PrivateRedis::start().await;
    let server = TestServer::start_with(pool, connect, with_redis(redis.url())).await;
    wait_until_redis_is_used(&server).await;
    let runtime = server.register("resilient", &["q"]).await;
    lease_cycle(&server, &runtime).await;
    warm(&server, &redis.url(), &runtime).await;

    redis.kill();

    let beat = server.heartbeat(&runtime).await;
    assert_eq!(beat.status(), pb::RuntimeStatus::Online);
    for _ in 0..3 {
        lease_cycle(&server, &runtime).await;
        assert!(server.claim(&runtime, Some(1)).await.is_empty());
        server.heartbeat(&runtime).await;
    }
    let redis_link = server.coordinator.redis().unwrap();
    assert!(!redis_link.is_healthy());
    let health = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    redis.restart().await;
    wait_until_redis_is_used(&server).await;
    lease_cycle(&server, &runtime).await;
    warm(&server, &redis.url(), &runtime).await;
    lease_cycle(&server, &runtime).await;
}

/// The whole chain in real time, with short durations: the background sweeper, Redis keys
/// expiring, a heartbeating runtime kept ONLINE and a silent one's work retried on it.
#[sqlx::test]
async fn a_silent_runtime_is_detected_by_the_background_sweeper(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let url = redis_url();
    let server = TestServer::start_with(pool, connect, |config| {
        with_redis(url.clone())(config);
        config.offline_after = Duration::from_millis(900);
        config.liveness_ttl = Duration::from_millis(400);
        config.heartbeat_interval = Duration::from_millis(100);
        config.sweep_interval = Duration::from_millis(100);
    })
    .await;
    wait_until_redis_is_used(&server).await;
    let silent = server.register("silent", &["q"]).await;
    let beating = server.register("beating", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&silent).await;
    server.start_task(&claimed).await.unwrap();

    let mut retried = None;
    for _ in 0..50 {
        server.heartbeat(&beating).await;
        if let Some(task) = server.claim(&beating, Some(1)).await.pop() {
            retried = Some(task);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let retried = retried.expect("the silent runtime's task was never retried");
    assert_eq!(task_id(&retried), task_id(&claimed));
    let task = retried.task.unwrap();
    assert_eq!(task.failure_reason(), pb::FailureReason::RuntimeOffline);
    assert_eq!(task.attempt, 2);
    assert_eq!(
        server.runtime_status(&silent).await,
        pb::RuntimeStatus::Offline
    );
    assert_eq!(
        server.runtime_status(&beating).await,
        pb::RuntimeStatus::Online
    );
}
