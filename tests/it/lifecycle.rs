//! Every transition of spec §2 that this release implements, over real gRPC.

use std::time::Duration;

use leasehold::proto::{self as pb, TaskStatus};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, assert_error, status_of, task_id, task_in};

async fn a_task_goes_from_enqueue_to_completed(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["emails"]).await;
    let enqueued = server.enqueue_to("emails").await;
    assert_eq!(status_of(&enqueued), TaskStatus::Queued);
    assert_eq!(enqueued.attempt, 1);
    assert_eq!(enqueued.max_attempts, 3, "0 means the default of 3");

    let claimed = server.claim_one(&runtime).await;
    let task = claimed.task.as_ref().unwrap();
    assert_eq!(task.id, enqueued.id);
    assert_eq!(status_of(task), TaskStatus::Dispatched);
    assert_eq!(task.claimed_by, runtime);
    assert!(uuid::Uuid::parse_str(&claimed.claim_token).is_ok());
    assert_eq!(claimed.lease_expires_at, task.lease_expires_at);

    let started = server.start_task(&claimed).await.unwrap();
    assert_eq!(status_of(&started), TaskStatus::Running);
    assert!(started.started_at.is_some());

    let completed = server.complete(&claimed, b"done").await.unwrap();
    assert_eq!(status_of(&completed), TaskStatus::Completed);
    assert_eq!(completed.result, b"done");
    assert!(completed.finished_at.is_some());
    assert_eq!(
        status_of(&server.get_task(&enqueued.id).await),
        TaskStatus::Completed
    );
}

async fn start_replayed_with_the_same_token_returns_the_running_row(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    let first = server.start_task(&claimed).await.unwrap();
    let replay = server.start_task(&claimed).await.unwrap();
    assert_eq!(status_of(&replay), TaskStatus::Running);
    assert_eq!(
        replay.started_at, first.started_at,
        "a replay writes nothing"
    );
}

async fn complete_and_fail_replays_succeed_with_the_current_row(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let to_complete = server.claim_one(&runtime).await;
    server.start_task(&to_complete).await.unwrap();
    let completed = server.complete(&to_complete, b"r").await.unwrap();
    let replayed = server.complete(&to_complete, b"r").await.unwrap();
    assert_eq!(replayed.finished_at, completed.finished_at);

    let to_fail = server.claim_one(&runtime).await;
    let failed = server.fail(&to_fail, false).await.unwrap();
    assert!(!failed.will_retry);
    let replayed = server.fail(&to_fail, false).await.unwrap();
    assert!(!replayed.will_retry);
    assert_eq!(
        status_of(replayed.task.as_ref().unwrap()),
        TaskStatus::Failed
    );
}

async fn claims_follow_priority_then_age(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let old_low = server.enqueue_to("q").await;
    let high = server
        .enqueue(pb::EnqueueTaskRequest {
            priority: 10,
            ..task_in("q")
        })
        .await;
    let young_low = server.enqueue_to("q").await;
    let order: Vec<String> = server
        .claim(&runtime, Some(3))
        .await
        .iter()
        .map(|claimed| task_id(claimed).to_owned())
        .collect();
    assert_eq!(order, vec![high.id, old_low.id, young_low.id]);
}

async fn a_runtime_claims_only_from_its_queues_and_its_pins(backend: Backend) {
    let server = backend.start().await;
    let mine = server.register("mine", &["q"]).await;
    let other = server.register("other", &["q"]).await;
    server.enqueue_to("elsewhere").await;
    server
        .enqueue(pb::EnqueueTaskRequest {
            runtime_id: other.clone(),
            ..task_in("q")
        })
        .await;
    assert!(server.claim(&mine, Some(5)).await.is_empty());
    let pinned = server.claim_one(&other).await;
    assert_eq!(pinned.task.unwrap().runtime_id, other);
}

async fn a_delayed_task_becomes_claimable_when_its_time_comes(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let delayed = server
        .enqueue(pb::EnqueueTaskRequest {
            delay: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..task_in("q")
        })
        .await;
    assert!(server.claim(&runtime, None).await.is_empty());
    server.advance_time(Duration::from_secs(3601)).await;
    assert_eq!(task_id(&server.claim_one(&runtime).await), delayed.id);
}

async fn max_tasks_absent_means_one_zero_means_none_and_large_is_capped(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    for _ in 0..40 {
        server.enqueue_to("q").await;
    }
    assert_eq!(server.claim(&runtime, None).await.len(), 1);
    assert_eq!(server.claim(&runtime, Some(0)).await.len(), 0);
    assert_eq!(server.claim(&runtime, Some(1000)).await.len(), 32);
}

async fn a_paused_queue_hands_out_nothing_until_resumed(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let paused = server.update_queue("q", None, Some(true)).await;
    assert!(paused.paused);
    assert!(server.claim(&runtime, None).await.is_empty());
    server.update_queue("q", None, Some(false)).await;
    assert_eq!(server.claim(&runtime, None).await.len(), 1);
}

async fn the_preflight_requeues_only_the_callers_own_expired_leases(backend: Backend) {
    let server = backend.start().await;
    let owner = server.register("owner", &["q"]).await;
    let bystander = server.register("bystander", &["q"]).await;
    let task = server.enqueue_to("q").await;
    let first = server.claim_one(&owner).await;
    server.let_leases_expire().await;

    // Another runtime's claim never requeues someone else's lease.
    assert!(server.claim(&bystander, Some(5)).await.is_empty());
    assert_eq!(
        status_of(&server.get_task(&task.id).await),
        TaskStatus::Dispatched
    );

    // The owner's own claim call requeues it first, then may claim it again.
    let second = server.claim_one(&owner).await;
    let reclaimed = second.task.as_ref().unwrap();
    assert_eq!(reclaimed.id, task.id);
    assert_eq!(reclaimed.lease_expirations, 1);
    assert_eq!(
        reclaimed.attempt, 1,
        "lease expiry does not consume an attempt"
    );
    assert_ne!(second.claim_token, first.claim_token);
}

async fn a_claim_with_max_tasks_zero_still_runs_the_preflight(backend: Backend) {
    let server = backend.start().await;
    let owner = server.register("owner", &["q"]).await;
    let task = server.enqueue_to("q").await;
    server.claim_one(&owner).await;
    server.let_leases_expire().await;
    assert!(server.claim(&owner, Some(0)).await.is_empty());
    let requeued = server.get_task(&task.id).await;
    assert_eq!(status_of(&requeued), TaskStatus::Queued);
    assert_eq!(requeued.lease_expirations, 1);
}

async fn a_task_whose_lease_keeps_expiring_is_failed_by_the_poison_guard(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.max_lease_expirations = 1;
        })
        .await;
    let owner = server.register("owner", &["q"]).await;
    let task = server.enqueue_to("q").await;
    server.claim_one(&owner).await;
    server.let_leases_expire().await;
    server.claim_one(&owner).await; // first expiry: requeued and claimed again
    server.let_leases_expire().await;
    assert!(server.claim(&owner, None).await.is_empty());
    let failed = server.get_task(&task.id).await;
    assert_eq!(status_of(&failed), TaskStatus::Failed);
    assert_eq!(failed.lease_expirations, 2);
    assert_eq!(
        pb::FailureReason::try_from(failed.failure_reason).unwrap(),
        pb::FailureReason::LeaseExpiredTooOften
    );
}

async fn a_retryable_failure_requeues_with_backoff_until_attempts_run_out(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.retry_backoff_base = Duration::from_secs(10);
            config.retry_backoff_max = Duration::from_secs(10);
        })
        .await;
    let runtime = server.register("worker-1", &["q"]).await;
    server
        .enqueue(pb::EnqueueTaskRequest {
            max_attempts: 2,
            ..task_in("q")
        })
        .await;
    let first = server.claim_one(&runtime).await;
    server.start_task(&first).await.unwrap();
    let failed = server.fail(&first, true).await.unwrap();
    assert!(failed.will_retry);
    let retried = failed.task.unwrap();
    assert_eq!(status_of(&retried), TaskStatus::Queued);
    assert_eq!(retried.attempt, 2);
    assert_eq!(retried.error, "boom");
    let backoff = retried.available_at.unwrap().seconds - retried.created_at.unwrap().seconds;
    assert!(
        (0..=11).contains(&backoff),
        "backoff within [0, 10s]: {backoff}"
    );

    // Not claimable during its backoff; make it due, then exhaust the attempts.
    assert!(server.claim(&runtime, None).await.is_empty());
    server.advance_time(Duration::from_secs(11)).await;
    let second = server.claim_one(&runtime).await;
    let last = server.fail(&second, true).await.unwrap();
    assert!(!last.will_retry, "attempt 2 of 2 is not retried");
    assert_eq!(status_of(last.task.as_ref().unwrap()), TaskStatus::Failed);
}

async fn a_fail_replay_after_the_task_was_retried_still_succeeds(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.retry_backoff_base = Duration::ZERO;
        })
        .await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let first = server.claim_one(&runtime).await;
    assert!(server.fail(&first, true).await.unwrap().will_retry);
    let second = server.claim_one(&runtime).await;
    server.start_task(&second).await.unwrap();

    let replay = server.fail(&first, true).await.unwrap();
    assert!(
        replay.will_retry,
        "the replay answers as the original call did"
    );
    assert_eq!(
        status_of(replay.task.as_ref().unwrap()),
        TaskStatus::Running
    );
    // The replay changed nothing: the new claim still owns the task.
    assert_eq!(
        status_of(&server.complete(&second, b"").await.unwrap()),
        TaskStatus::Completed
    );
}

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
    a_task_goes_from_enqueue_to_completed,
    start_replayed_with_the_same_token_returns_the_running_row,
    complete_and_fail_replays_succeed_with_the_current_row,
    claims_follow_priority_then_age,
    a_runtime_claims_only_from_its_queues_and_its_pins,
    a_delayed_task_becomes_claimable_when_its_time_comes,
    max_tasks_absent_means_one_zero_means_none_and_large_is_capped,
    a_paused_queue_hands_out_nothing_until_resumed,
    the_preflight_requeues_only_the_callers_own_expired_leases,
    a_claim_with_max_tasks_zero_still_runs_the_preflight,
    a_task_whose_lease_keeps_expiring_is_failed_by_the_poison_guard,
    a_retryable_failure_requeues_with_backoff_until_attempts_run_out,
    a_fail_replay_after_the_task_was_retried_still_succeeds,
    cancel_ends_active_tasks_and_leaves_finished_ones_alone,
    extend_lease_renews_a_dispatched_claim_up_to_the_lease_duration,
    usage_reports_upsert_and_replay_after_the_task_finished,
    an_idempotency_key_returns_the_first_task,
    re_registering_a_name_keeps_the_runtime_id,
    get_task_status_reports_status_and_attempt,
);
