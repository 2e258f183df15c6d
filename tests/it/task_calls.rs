//! The calls on one task besides claiming it, over real gRPC: cancel, extend, usage,
//! idempotency keys, status, heartbeats, redrive, batch enqueue (the claim's own transitions
//! are in lifecycle.rs).

use std::time::Duration;

use leasehold::proto::{self as pb, TaskStatus};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, assert_error, status_of, task_id, task_in};

async fn cancel_ends_active_tasks_and_leaves_finished_ones_alone(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let queued = server.enqueue_to("q").await;
    let cancel = |id: String| {
        let mut tasks = server.tasks.clone();
        async move {
            tasks
                .cancel_task(pb::CancelTaskRequest { task_id: id })
                .await
                .unwrap()
                .into_inner()
                .task
                .unwrap()
        }
    };
    assert_eq!(
        status_of(&cancel(queued.id.clone()).await),
        TaskStatus::Cancelled
    );

    server.enqueue_to("q").await;
    let running = server.claim_one(&runtime).await;
    server.start_task(&running).await.unwrap();
    let cancelled = cancel(task_id(&running).into()).await;
    assert_eq!(status_of(&cancelled), TaskStatus::Cancelled);
    assert_eq!(
        pb::FailureReason::try_from(cancelled.failure_reason).unwrap(),
        pb::FailureReason::Cancelled
    );
    let refused = server.complete(&running, b"").await.unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "TASK_CANCELLED");

    server.enqueue_to("q").await;
    let done = server.claim_one(&runtime).await;
    server.start_task(&done).await.unwrap();
    server.complete(&done, b"kept").await.unwrap();
    let unchanged = cancel(task_id(&done).into()).await;
    assert_eq!(status_of(&unchanged), TaskStatus::Completed);
    assert_eq!(unchanged.result, b"kept");
}

async fn extend_lease_renews_a_dispatched_claim_up_to_the_lease_duration(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let task = server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    // 50 of the 60 lease seconds pass; 10 are left.
    server.advance_time(Duration::from_secs(50)).await;
    let extend = |extend_by: Option<prost_types::Duration>| {
        let mut worker = server.worker.clone();
        let request = pb::ExtendLeaseRequest {
            task_id: task.id.clone(),
            claim_token: claimed.claim_token.clone(),
            extend_by,
        };
        async move { worker.extend_lease(request).await }
    };
    let renewed = extend(Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    }))
    .await
    .unwrap()
    .into_inner()
    .lease_expires_at
    .unwrap();
    let now = server.store_time(&runtime).await;
    assert!(
        (55..=65).contains(&(renewed.seconds - now.seconds)),
        "an hour is clamped to the 60s lease: {renewed:?} at {now:?}"
    );
    assert_eq!(
        server.get_task(&task.id).await.lease_expires_at,
        Some(renewed)
    );

    server.start_task(&claimed).await.unwrap();
    let refused = extend(None).await.unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "TASK_ALREADY_STARTED");
}

async fn usage_reports_upsert_and_replay_after_the_task_finished(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let task = server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    let report = |tokens: i64| {
        let mut worker = server.worker.clone();
        let request = pb::ReportUsageRequest {
            task_id: task.id.clone(),
            claim_token: claimed.claim_token.clone(),
            counters: [("tokens".to_string(), tokens)].into_iter().collect(),
        };
        async move { worker.report_usage(request).await }
    };
    report(5).await.unwrap();
    report(7).await.unwrap();
    report(7).await.unwrap();

    server.complete(&claimed, b"").await.unwrap();
    report(7)
        .await
        .expect("the same report after completion is a replay");
    let refused = report(8).await.unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "TASK_TERMINAL");
}

async fn an_idempotency_key_returns_the_first_task(backend: Backend) {
    let server = backend.start().await;
    let request = pb::EnqueueTaskRequest {
        idempotency_key: "order-42".into(),
        ..task_in("q")
    };
    let first = server
        .tasks
        .clone()
        .enqueue_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    let second = server
        .tasks
        .clone()
        .enqueue_task(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!first.deduplicated);
    assert!(second.deduplicated);
    assert_eq!(first.task.unwrap().id, second.task.unwrap().id);
    let other_queue = server
        .tasks
        .clone()
        .enqueue_task(pb::EnqueueTaskRequest {
            queue: "other".into(),
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!other_queue.deduplicated, "keys are scoped to a queue");
}

async fn re_registering_a_name_keeps_the_runtime_id(backend: Backend) {
    let server = backend.start().await;
    let first = server.register("worker-1", &["a"]).await;
    let second = server.register("worker-1", &["a", "b"]).await;
    assert_eq!(first, second);
    let beat = server.heartbeat(&first).await;
    assert_eq!(beat.status(), pb::RuntimeStatus::Online);
    assert!(beat.server_time.is_some());
}

async fn get_task_status_reports_status_and_attempt(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let task = server.enqueue_to("q").await;
    server.claim_one(&runtime).await;
    let status = server
        .worker
        .clone()
        .get_task_status(pb::GetTaskStatusRequest {
            task_id: task.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), TaskStatus::Dispatched);
    assert_eq!(status.attempt, 1);
}

#[sqlx::test]
async fn a_heartbeat_brings_an_offline_runtime_back_online(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = Backend::Postgres(Box::new((pool, connect))).start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    sqlx::query("UPDATE runtimes SET status = 'OFFLINE', last_seen_at = now() - interval '1 hour' WHERE id = $1::uuid")
        .bind(&runtime)
        .execute(server.pool())
        .await
        .unwrap();
    let beat = server.heartbeat(&runtime).await;
    assert_eq!(beat.status(), pb::RuntimeStatus::Online);
    let last_seen: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_seen_at FROM runtimes WHERE id = $1::uuid")
            .bind(&runtime)
            .fetch_one(server.pool())
            .await
            .unwrap();
    assert!(chrono::Utc::now() - last_seen < chrono::Duration::seconds(30));
}

async fn durations_finer_than_a_microsecond_are_accepted(backend: Backend) {
    let server = backend.start().await;
    let task = server
        .enqueue(pb::EnqueueTaskRequest {
            delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1,
            }),
            ..task_in("q")
        })
        .await;
    assert_eq!(status_of(&task), pb::TaskStatus::Queued);
}

async fn retry_task_redrives_failed_and_cancelled_tasks_only(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("r", &["q"]).await;
    let failing = server
        .enqueue(pb::EnqueueTaskRequest {
            max_attempts: 1,
            ..task_in("q")
        })
        .await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    assert!(!server.fail(&claimed, true).await.unwrap().will_retry);
    let cancelled = server.enqueue_to("q").await;
    server
        .tasks
        .clone()
        .cancel_task(pb::CancelTaskRequest {
            task_id: cancelled.id.clone(),
        })
        .await
        .unwrap();
    let mut admin = server.admin.clone();

    for task_id in [&failing.id, &cancelled.id] {
        let redriven = admin
            .retry_task(pb::RetryTaskRequest {
                task_id: task_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert_eq!(status_of(&redriven), pb::TaskStatus::Queued);
        assert_eq!((redriven.attempt, redriven.error.as_str()), (1, ""));
    }
    let late = server.complete(&claimed, b"late").await.unwrap_err();
    assert_error(&late, Code::FailedPrecondition, "CLAIM_SUPERSEDED");
    let again = server.claim(&runtime, Some(2)).await;
    assert_eq!(again.len(), 2);

    let refused = admin
        .retry_task(pb::RetryTaskRequest {
            task_id: task_id(&again[0]).into(),
        })
        .await
        .unwrap_err();
    assert_error(&refused, Code::FailedPrecondition, "TASK_NOT_RETRYABLE");
    let unknown = admin
        .retry_task(pb::RetryTaskRequest {
            task_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_error(&unknown, Code::NotFound, "TASK_NOT_FOUND");
}

/// The reason of the ErrorInfo in a `google.rpc.Status`.
fn error_reason(status: &tonic_types::pb::Status) -> String {
    use prost::Message as _;
    status
        .details
        .iter()
        .find(|detail| detail.type_url.ends_with("google.rpc.ErrorInfo"))
        .and_then(|detail| tonic_types::pb::ErrorInfo::decode(detail.value.as_slice()).ok())
        .map(|info| info.reason)
        .unwrap_or_default()
}

async fn enqueue_tasks_answers_every_item_in_order(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("r", &["q"]).await;
    let keyed = |key: &str| pb::EnqueueTaskRequest {
        idempotency_key: key.into(),
        ..task_in("q")
    };
    let earlier = server.enqueue(keyed("earlier")).await;
    let requests = vec![
        task_in("q"),
        task_in("not a queue!"),
        pb::EnqueueTaskRequest {
            runtime_id: uuid::Uuid::new_v4().to_string(),
            ..task_in("q")
        },
        keyed("k"),
        keyed("k"),
        keyed("earlier"),
        pb::EnqueueTaskRequest {
            runtime_id: runtime.clone(),
            ..task_in("q")
        },
    ];

    let results = server
        .tasks
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest { requests })
        .await
        .unwrap()
        .into_inner()
        .results;

    assert_eq!(results.len(), 7);
    let stored = |index: usize| results[index].task.clone().expect("a stored task");
    assert!(results[0].error.is_none() && !results[0].deduplicated);
    let invalid = results[1].error.as_ref().expect("an error");
    assert_eq!(invalid.code, Code::InvalidArgument as i32);
    assert_eq!(error_reason(invalid), "INVALID_FIELD");
    let unknown_pin = results[2].error.as_ref().expect("an error");
    assert_eq!(unknown_pin.code, Code::NotFound as i32);
    assert_eq!(error_reason(unknown_pin), "RUNTIME_NOT_FOUND");
    assert!(!results[3].deduplicated);
    assert!(results[4].deduplicated);
    assert_eq!(stored(4).id, stored(3).id);
    assert!(results[5].deduplicated);
    assert_eq!(stored(5).id, earlier.id);
    assert_eq!(stored(6).runtime_id, runtime);
    // Three new tasks plus the earlier one are claimable.
    assert_eq!(server.claim(&runtime, Some(10)).await.len(), 4);
}

async fn enqueue_tasks_refuses_more_than_a_thousand(backend: Backend) {
    let server = backend.start().await;
    let status = server
        .tasks
        .clone()
        .enqueue_tasks(pb::EnqueueTasksRequest {
            requests: vec![task_in("q"); 1001],
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
    let counts = server.describe_queue("q").await.counts.unwrap();
    assert_eq!(counts.queued, 0);
}

conformance!(
    enqueue_tasks_answers_every_item_in_order,
    enqueue_tasks_refuses_more_than_a_thousand,
    retry_task_redrives_failed_and_cancelled_tasks_only,
    durations_finer_than_a_microsecond_are_accepted,
    cancel_ends_active_tasks_and_leaves_finished_ones_alone,
    extend_lease_renews_a_dispatched_claim_up_to_the_lease_duration,
    usage_reports_upsert_and_replay_after_the_task_finished,
    an_idempotency_key_returns_the_first_task,
    re_registering_a_name_keeps_the_runtime_id,
    get_task_status_reports_status_and_attempt,
);
