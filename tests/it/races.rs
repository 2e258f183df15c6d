//! Claims racing each other in PostgreSQL: caps, concurrency keys, exactly-once dispatch, and
//! StartTask against the preflight at the lease boundary.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use leasehold::proto::{self as pb, TaskStatus};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, status_of, task_id, task_in};

/// Registers `count` runtimes serving `queue` and has each claim once, all at the same time.
async fn race_claims(server: &TestServer, queue: &str, count: usize) -> Vec<pb::ClaimedTask> {
    let mut runtimes = Vec::new();
    for index in 0..count {
        runtimes.push(server.register(&format!("racer-{index}"), &[queue]).await);
    }
    let claims = runtimes
        .iter()
        .map(|runtime| server.claim(runtime, Some(1)));
    join_all(claims).await.into_iter().flatten().collect()
}

async fn twenty_claimers_on_a_queue_capped_at_one_dispatch_exactly_one(backend: Backend) {
    let server = backend.start().await;
    server.update_queue("capped", Some(1), None).await;
    for _ in 0..20 {
        server.enqueue_to("capped").await;
    }
    let claimed = race_claims(&server, "capped", 20).await;
    assert_eq!(claimed.len(), 1);
}

async fn twenty_claimers_on_tasks_sharing_a_concurrency_key_dispatch_exactly_one(backend: Backend) {
    let server = backend.start().await;
    for _ in 0..20 {
        server
            .enqueue(pb::EnqueueTaskRequest {
                concurrency_key: "tenant-7".into(),
                ..task_in("keyed")
            })
            .await;
    }
    let claimed = race_claims(&server, "keyed", 20).await;
    assert_eq!(claimed.len(), 1);

    // The key frees up when the holder finishes.
    let holder = &claimed[0];
    server.start_task(holder).await.unwrap();
    server.complete(holder, b"").await.unwrap();
    let runtime = server.register("after", &["keyed"]).await;
    assert_eq!(server.claim(&runtime, Some(5)).await.len(), 1);
}

async fn twelve_claimers_draining_sixty_tasks_dispatch_each_exactly_once(backend: Backend) {
    let server = backend.start().await;
    let mut enqueued = HashSet::new();
    for _ in 0..60 {
        enqueued.insert(server.enqueue_to("drain").await.id);
    }
    let mut runtimes = Vec::new();
    for index in 0..12 {
        runtimes.push(
            server
                .register(&format!("drainer-{index}"), &["drain"])
                .await,
        );
    }
    let drainers = runtimes.iter().map(|runtime| async {
        let mut mine = Vec::new();
        loop {
            let batch = server.claim(runtime, Some(3)).await;
            if batch.is_empty() {
                return mine;
            }
            mine.extend(batch.iter().map(|claimed| task_id(claimed).to_owned()));
        }
    });
    let dispatched: Vec<String> = join_all(drainers).await.into_iter().flatten().collect();
    assert_eq!(dispatched.len(), 60, "no task dispatched twice");
    assert_eq!(dispatched.into_iter().collect::<HashSet<_>>(), enqueued);
}

#[sqlx::test]
async fn start_racing_the_owners_preflight_at_the_lease_boundary_has_one_winner(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = Backend::Postgres(Box::new((pool, connect))).start().await;
    let runtime = server.register("owner", &["boundary"]).await;
    let mut start_won = 0;
    let mut preflight_won = 0;
    for round in 0..20 {
        let task = server.enqueue_to("boundary").await;
        let claimed = server.claim_one(&runtime).await;
        // Put the lease end a few milliseconds ahead, so the two calls land around it.
        sqlx::query(
            "UPDATE tasks SET lease_expires_at = now() + make_interval(secs => $2) WHERE id = $1::uuid",
        )
        .bind(&task.id)
        .bind(0.002 * f64::from(round % 5))
        .execute(server.pool())
        .await
        .unwrap();
        let (started, _) =
            tokio::join!(server.start_task(&claimed), server.claim(&runtime, Some(0)));
        let after = server.get_task(&task.id).await;
        match started {
            Ok(_) => {
                start_won += 1;
                assert_eq!(status_of(&after), TaskStatus::Running);
                assert_eq!(
                    after.lease_expirations, 0,
                    "a started task is never requeued"
                );
            }
            Err(status) => {
                preflight_won += 1;
                assert_error(&status, Code::FailedPrecondition, "LEASE_EXPIRED");
                if after.lease_expirations == 0 {
                    // Refused before the preflight ran: the owner's next claim requeues it.
                    server.claim(&runtime, Some(0)).await;
                }
                let requeued = server.get_task(&task.id).await;
                assert_eq!(status_of(&requeued), TaskStatus::Queued);
                assert_eq!(requeued.lease_expirations, 1);
            }
        }
        // Clear the board for the next round.
        sqlx::query("UPDATE tasks SET status = 'CANCELLED' WHERE id = $1::uuid")
            .bind(&task.id)
            .execute(server.pool())
            .await
            .unwrap();
    }
    assert_eq!(start_won + preflight_won, 20);
}

#[sqlx::test]
async fn a_claim_whose_deadline_passes_before_commit_is_rolled_back(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = Backend::Postgres(Box::new((pool, connect))).start().await;
    let runtime = server.register("late", &["slow"]).await;
    server.update_queue("slow", Some(5), None).await;
    let task = server.enqueue_to("slow").await;

    // Hold the capped queue's row so the claim waits past its deadline.
    let mut blocker = server.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM queues WHERE name = 'slow' FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::ClaimTaskRequest {
        runtime_id: runtime.clone(),
        max_tasks: Some(1),
        wait: None,
    });
    request.set_timeout(Duration::from_millis(200));
    let claim = tokio::spawn({
        let mut worker = server.worker.clone();
        async move { worker.claim_task(request).await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    blocker.rollback().await.unwrap();
    let status = claim.await.unwrap().unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // Give the abandoned statement time to finish; it must have rolled back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status_of(&server.get_task(&task.id).await),
        TaskStatus::Queued
    );
    assert_eq!(server.claim(&runtime, None).await.len(), 1);
}

conformance!(
    twenty_claimers_on_a_queue_capped_at_one_dispatch_exactly_one,
    twenty_claimers_on_tasks_sharing_a_concurrency_key_dispatch_exactly_one,
    twelve_claimers_draining_sixty_tasks_dispatch_each_exactly_once,
);
