//! Runtimes and the sweeper (spec §2 T4'', T7, T10 and §6), on both stores, without Redis:
//! time is moved with `advance_time` and sweeps are run explicitly.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use leasehold::domain::liveness::RedisView;
use leasehold::domain::{RuntimeId, TaskStatus};
use leasehold::proto as pb;
use leasehold::store::{LivenessOracle, TaskStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, status_of, task_id, task_in};

const OFFLINE_AFTER: Duration = Duration::from_secs(150);

/// Retries become claimable at once, so a test can claim a retried task straight away.
async fn start(backend: Backend) -> TestServer {
    backend
        .start_with(|config| config.retry_backoff_base = Duration::ZERO)
        .await
}

fn reason_of(task: &pb::Task) -> pb::FailureReason {
    task.failure_reason()
}

async fn deregistering_requeues_unstarted_claims_at_once(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("leaving", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let claimed = server.claim(&runtime, Some(2)).await;
    server.start_task(&claimed[0]).await.unwrap();

    let requeued = server.deregister(&runtime).await;

    assert_eq!(requeued, 1);
    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Offline
    );
    let unstarted = server.get_task(task_id(&claimed[1])).await;
    assert_eq!(status_of(&unstarted), pb::TaskStatus::Queued);
    assert_eq!(
        unstarted.lease_expirations, 0,
        "a deregistration is not a lease expiry"
    );
    let late = server.start_task(&claimed[1]).await.unwrap_err();
    assert_error(&late, Code::FailedPrecondition, "CLAIM_SUPERSEDED");
    let started = server.get_task(task_id(&claimed[0])).await;
    assert_eq!(status_of(&started), pb::TaskStatus::Running);

    // A heartbeat brings it back.
    let beat = server.heartbeat(&runtime).await;
    assert_eq!(beat.status(), pb::RuntimeStatus::Online);
}

async fn recovering_orphans_fails_and_retries_held_tasks(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("restarted", &["q"]).await;
    let retried = server.enqueue_to("q").await;
    let last_attempt = server
        .enqueue(pb::EnqueueTaskRequest {
            max_attempts: 1,
            ..task_in("q")
        })
        .await;
    let claimed = server.claim(&runtime, Some(2)).await;
    server.start_task(&claimed[0]).await.unwrap();

    let response = server
        .worker
        .clone()
        .recover_orphans(pb::RecoverOrphansRequest {
            runtime_id: runtime.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    assert_eq!((response.failed, response.retried), (2, 1));
    let retried = server.get_task(&retried.id).await;
    assert_eq!(status_of(&retried), pb::TaskStatus::Queued);
    assert_eq!(retried.attempt, 2);
    assert_eq!(reason_of(&retried), pb::FailureReason::RuntimeRecovery);
    let last_attempt = server.get_task(&last_attempt.id).await;
    assert_eq!(status_of(&last_attempt), pb::TaskStatus::Failed);
    assert_eq!(reason_of(&last_attempt), pb::FailureReason::RuntimeRecovery);

    let unknown = server
        .worker
        .clone()
        .recover_orphans(pb::RecoverOrphansRequest {
            runtime_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_error(&unknown, Code::NotFound, "RUNTIME_NOT_FOUND");
}

async fn runtimes_are_listed_by_status(backend: Backend) {
    let server = start(backend).await;
    let staying = server.register("b-staying", &["q"]).await;
    let leaving = server.register("a-leaving", &["q"]).await;
    server.deregister(&leaving).await;

    let names = |runtimes: Vec<pb::Runtime>| -> Vec<String> {
        runtimes.into_iter().map(|runtime| runtime.name).collect()
    };
    assert_eq!(
        names(server.runtimes(None).await),
        ["a-leaving", "b-staying"]
    );
    let online = server.runtimes(Some(pb::RuntimeStatus::Online)).await;
    assert_eq!(
        online.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [staying]
    );
    let offline = server.runtimes(Some(pb::RuntimeStatus::Offline)).await;
    assert_eq!(
        offline.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [leaving]
    );
}

async fn a_silent_runtime_goes_offline_and_its_running_task_is_retried_elsewhere(backend: Backend) {
    let server = start(backend).await;
    let silent = server.register("silent", &["q"]).await;
    let healthy = server.register("healthy", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&silent).await;
    server.start_task(&claimed).await.unwrap();

    server
        .advance_time(OFFLINE_AFTER + Duration::from_secs(1))
        .await;
    server.heartbeat(&healthy).await;
    let report = server.sweep().await;

    assert_eq!(report.marked_offline.len(), 1);
    assert_eq!(
        server.runtime_status(&silent).await,
        pb::RuntimeStatus::Offline
    );
    assert_eq!(
        server.runtime_status(&healthy).await,
        pb::RuntimeStatus::Online
    );
    let task = server.get_task(task_id(&claimed)).await;
    assert_eq!(status_of(&task), pb::TaskStatus::Queued);
    assert_eq!(reason_of(&task), pb::FailureReason::RuntimeOffline);
    assert_eq!(task.attempt, 2);
    let reclaimed = server.claim_one(&healthy).await;
    assert_eq!(task_id(&reclaimed), task_id(&claimed));
    // The dead runtime's token no longer writes anything.
    let late = server.complete(&claimed, b"late").await.unwrap_err();
    assert_error(&late, Code::FailedPrecondition, "CLAIM_SUPERSEDED");
}

async fn a_heartbeating_runtime_keeps_its_running_task(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("steady", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();

    for _ in 0..5 {
        server.advance_time(Duration::from_secs(100)).await;
        server.heartbeat(&runtime).await;
        let report = server.sweep().await;
        assert!(report.marked_offline.is_empty());
        assert!(report.runtime_offline.is_empty() && report.timed_out.is_empty());
    }

    let task = server.get_task(task_id(&claimed)).await;
    assert_eq!(status_of(&task), pb::TaskStatus::Running);
    server.complete(&claimed, b"done").await.unwrap();
}

async fn a_dead_runtimes_expired_claim_waits_for_offline_detection(backend: Backend) {
    let server = start(backend).await;
    let dead = server.register("dead", &["q"]).await;
    let other = server.register("other", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&dead).await;

    // The lease passes, but only the dead runtime's own preflight could requeue it.
    server.advance_time(Duration::from_secs(61)).await;
    server.heartbeat(&other).await;
    assert!(server.claim(&other, Some(1)).await.is_empty());
    server.sweep().await;
    assert!(server.claim(&other, Some(1)).await.is_empty());
    let task = server.get_task(task_id(&claimed)).await;
    assert_eq!(status_of(&task), pb::TaskStatus::Dispatched);

    // Offline detection fails it as RUNTIME_OFFLINE, which retries it.
    server.advance_time(Duration::from_secs(100)).await;
    server.heartbeat(&other).await;
    let report = server.sweep().await;
    assert_eq!(report.runtime_offline.len(), 1);
    let reclaimed = server.claim_one(&other).await;
    assert_eq!(task_id(&reclaimed), task_id(&claimed));
    assert_eq!(
        reason_of(reclaimed.task.as_ref().unwrap()),
        pb::FailureReason::RuntimeOffline
    );
}

async fn dispatch_and_execution_timeouts_fail_and_retry(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("slow", &["q"]).await;
    let unstarted = server.enqueue_to("q").await;
    let bounded = server
        .enqueue(pb::EnqueueTaskRequest {
            execution_timeout: Some(crate::harness::wire_millis(10000)),
            ..task_in("q")
        })
        .await;
    let claimed = server.claim(&runtime, Some(2)).await;
    let running = claimed
        .iter()
        .find(|claim| task_id(claim) == bounded.id)
        .unwrap();
    server.start_task(running).await.unwrap();
    // Kept alive while its first claim waits (lease extended) past the dispatch timeout.
    server.advance_time(Duration::from_secs(301)).await;
    server.heartbeat(&runtime).await;

    let report = server.sweep().await;

    assert_eq!(report.timed_out.len(), 2);
    let unstarted = server.get_task(&unstarted.id).await;
    assert_eq!(reason_of(&unstarted), pb::FailureReason::DispatchTimeout);
    assert_eq!(status_of(&unstarted), pb::TaskStatus::Queued);
    let bounded = server.get_task(&bounded.id).await;
    assert_eq!(reason_of(&bounded), pb::FailureReason::ExecutionTimeout);
    assert_eq!(
        (status_of(&bounded), bounded.attempt),
        (pb::TaskStatus::Queued, 2)
    );
}

async fn a_pinned_task_of_a_long_gone_runtime_ends_runtime_gone(backend: Backend) {
    let server = start(backend).await;
    let gone = server.register("gone", &["q"]).await;
    server.deregister(&gone).await;
    let pinned = server
        .enqueue(pb::EnqueueTaskRequest {
            runtime_id: gone.clone(),
            ..task_in("q")
        })
        .await;

    assert!(server.sweep().await.runtime_gone.is_empty());
    server.advance_time(Duration::from_secs(3601)).await;
    let report = server.sweep().await;

    assert_eq!(report.runtime_gone.len(), 1);
    let task = server.get_task(&pinned.id).await;
    assert_eq!(status_of(&task), pb::TaskStatus::Failed);
    assert_eq!(reason_of(&task), pb::FailureReason::RuntimeGone);
}

/// Plays a heartbeat between the sweeper's stale-runtime query and its offline flip.
struct HeartbeatMeanwhile(Arc<dyn TaskStore>);

#[async_trait]
impl LivenessOracle for HeartbeatMeanwhile {
    async fn view(&self, runtimes: &[RuntimeId]) -> RedisView {
        for runtime in runtimes {
            self.0.heartbeat(*runtime).await.unwrap();
        }
        RedisView::default()
    }
}

/// Knows nobody alive, touches nothing.
struct NobodyAlive;

#[async_trait]
impl LivenessOracle for NobodyAlive {
    async fn view(&self, _runtimes: &[RuntimeId]) -> RedisView {
        RedisView::default()
    }
}

async fn a_heartbeat_between_select_and_flip_vetoes_it(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("lucky", &["q"]).await;
    server
        .advance_time(OFFLINE_AFTER + Duration::from_secs(1))
        .await;
    let store = server.store();
    let policy = server.coordinator.settings().sweep;

    let vetoed = store
        .sweep(&policy, &HeartbeatMeanwhile(store.clone()), None)
        .await
        .unwrap()
        .unwrap();
    assert!(vetoed.marked_offline.is_empty());
    assert_eq!(
        server.runtime_status(&runtime).await,
        pb::RuntimeStatus::Online
    );

    server
        .advance_time(OFFLINE_AFTER + Duration::from_secs(1))
        .await;
    let flipped = store
        .sweep(&policy, &NobodyAlive, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flipped.marked_offline.len(), 1);
}

async fn a_delayed_task_that_became_available_is_reported(backend: Backend) {
    let server = start(backend).await;
    server.register("waiting", &["q"]).await;
    let delayed = server
        .enqueue(pb::EnqueueTaskRequest {
            delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            ..task_in("q")
        })
        .await;
    let first = server.sweep().await;
    assert!(first.became_available.is_empty());
    // Real time: stage 5 looks at the window between two sweeps, which moving stored
    // timestamps back would skip over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = server
        .coordinator
        .sweep(first.swept_at)
        .await
        .unwrap()
        .unwrap();
    let moved: Vec<String> = report
        .became_available
        .iter()
        .map(|moved| moved.task_id.to_string())
        .collect();
    assert_eq!(moved, [delayed.id]);
    assert_eq!(report.became_available[0].status, TaskStatus::Queued);
}

conformance!(
    deregistering_requeues_unstarted_claims_at_once,
    recovering_orphans_fails_and_retries_held_tasks,
    runtimes_are_listed_by_status,
    a_silent_runtime_goes_offline_and_its_running_task_is_retried_elsewhere,
    a_heartbeating_runtime_keeps_its_running_task,
    a_dead_runtimes_expired_claim_waits_for_offline_detection,
    dispatch_and_execution_timeouts_fail_and_retry,
    a_pinned_task_of_a_long_gone_runtime_ends_runtime_gone,
    a_heartbeat_between_select_and_flip_vetoes_it,
    a_delayed_task_that_became_available_is_reported,
);

/// Two replicas on one database, sweeping at the same time in small batches: every task of
/// the dead runtime is failed exactly once.
#[sqlx::test]
async fn two_replicas_sweeping_never_process_a_row_twice(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let configure = |config: &mut leasehold::config::Config| {
        config.sweep_batch_size = 7;
        config.retry_backoff_base = Duration::from_secs(3600);
    };
    let a = TestServer::start_with(pool.clone(), connect.clone(), configure).await;
    let b = TestServer::start_with(pool, connect, configure).await;
    let dead = a.register("dead", &["q"]).await;
    let mut held = BTreeSet::new();
    for _ in 0..100 {
        held.insert(a.enqueue_to("q").await.id);
    }
    while a.claim(&dead, Some(32)).await.len() == 32 {}
    a.advance_time(OFFLINE_AFTER + Duration::from_secs(1)).await;

    let mut failed = Vec::new();
    for _ in 0..3 {
        let (from_a, from_b) = tokio::join!(a.coordinator.sweep(None), b.coordinator.sweep(None));
        for report in [from_a.unwrap(), from_b.unwrap()].into_iter().flatten() {
            failed.extend(
                report
                    .runtime_offline
                    .iter()
                    .map(|moved| moved.task_id.to_string()),
            );
        }
    }

    let unique: BTreeSet<String> = failed.iter().cloned().collect();
    assert_eq!(failed.len(), unique.len(), "a task was failed twice");
    assert_eq!(unique, held);
    let attempts: Vec<i64> = sqlx::query_scalar("SELECT attempt FROM tasks")
        .fetch_all(a.pool())
        .await
        .unwrap();
    assert!(attempts.iter().all(|attempt| *attempt == 2), "{attempts:?}");
}
