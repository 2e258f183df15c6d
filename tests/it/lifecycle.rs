//! Every transition of spec §2 that this release implements, over real gRPC.

use std::time::Duration;

use leasehold::proto::{self as pb, TaskStatus};

use crate::harness::{Backend, status_of, task_id, task_in};

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

conformance!(
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
);
