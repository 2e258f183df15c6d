//! Every row of spec §4's error table, with code, reason and metadata.

use std::time::Duration;

use leasehold::proto as pb;
use leasehold::store::TaskStore as _;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_types::StatusExt;

use crate::harness::{Backend, assert_error, error_metadata, task_id, task_in};

async fn field_errors_are_invalid_field_with_bad_request_details(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.max_payload_bytes = 8;
        })
        .await;
    let mut tasks = server.tasks.clone();
    let cases = [
        (
            "queue",
            pb::EnqueueTaskRequest {
                queue: String::new(),
                ..Default::default()
            },
        ),
        ("queue", task_in("bad queue/name")),
        (
            "payload",
            pb::EnqueueTaskRequest {
                payload: vec![0; 9],
                ..task_in("q")
            },
        ),
        (
            "runtime_id",
            pb::EnqueueTaskRequest {
                runtime_id: "not-a-uuid".into(),
                ..task_in("q")
            },
        ),
        (
            "delay",
            pb::EnqueueTaskRequest {
                delay: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..task_in("q")
            },
        ),
    ];
    for (field, request) in cases {
        let status = tasks.enqueue_task(request).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
        let bad_request = status
            .get_details_bad_request()
            .expect("BadRequest details");
        assert_eq!(bad_request.field_violations[0].field, field);
    }
    let missing = tasks
        .get_task(pb::GetTaskRequest {
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_error(&missing, Code::InvalidArgument, "INVALID_FIELD");
    let malformed = server
        .worker
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            runtime_id: "42".into(),
        })
        .await
        .unwrap_err();
    assert_error(&malformed, Code::InvalidArgument, "INVALID_FIELD");
    let stored = tasks
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(stored.is_empty(), "a rejected enqueue stores nothing");
}

async fn a_missing_or_malformed_claim_token_is_its_own_reason(backend: Backend) {
    let server = backend.start().await;
    let task = server.enqueue_to("q").await;
    for token in ["", "not-a-token"] {
        let status = server.start_with_token(&task.id, token).await.unwrap_err();
        assert_error(&status, Code::InvalidArgument, "MALFORMED_CLAIM_TOKEN");
    }
}

async fn unknown_tasks_and_runtimes_are_not_found(backend: Backend) {
    let server = backend.start().await;
    let nobody = uuid::Uuid::new_v4().to_string();
    let status = server
        .start_with_token(&nobody, &uuid::Uuid::new_v4().to_string())
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "TASK_NOT_FOUND");
    assert_eq!(error_metadata(&status, "task_id"), Some(nobody.clone()));

    let status = server.try_claim(&nobody, None).await.unwrap_err();
    assert_error(&status, Code::NotFound, "RUNTIME_NOT_FOUND");
    let status = server
        .worker
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            runtime_id: nobody.clone(),
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "RUNTIME_NOT_FOUND");
    let status = server
        .tasks
        .clone()
        .enqueue_task(pb::EnqueueTaskRequest {
            runtime_id: nobody,
            ..task_in("q")
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::NotFound, "RUNTIME_NOT_FOUND");
}

async fn a_token_from_a_superseded_claim_is_refused(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let task = server.enqueue_to("q").await;
    let first = server.claim_one(&runtime).await;
    server.let_leases_expire().await;
    let second = server.claim_one(&runtime).await;

    // The previous claim ended by lease expiry: LEASE_EXPIRED, with the task's facts.
    let status = server.start_task(&first).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "LEASE_EXPIRED");
    assert_eq!(error_metadata(&status, "task_id"), Some(task.id.clone()));
    assert_eq!(
        error_metadata(&status, "status").as_deref(),
        Some("TASK_STATUS_DISPATCHED")
    );
    assert!(error_metadata(&status, "lease_expires_at").is_some());

    // A token the task never knew (or forgot): CLAIM_SUPERSEDED.
    let stranger = pb::ClaimedTask {
        claim_token: uuid::Uuid::new_v4().to_string(),
        ..second.clone()
    };
    let status = server.fail(&stranger, false).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "CLAIM_SUPERSEDED");

    // Nothing the refused writes carried reached the task.
    let task_now = server.get_task(&task.id).await;
    assert_eq!(task_now.status(), pb::TaskStatus::Dispatched);
    assert!(server.start_task(&second).await.is_ok());
}

async fn the_current_token_after_its_lease_passed_is_lease_expired(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.let_leases_expire().await;
    let status = server.start_task(&claimed).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "LEASE_EXPIRED");
    let status = server.fail(&claimed, true).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "LEASE_EXPIRED");
}

async fn starting_a_task_running_under_another_token_is_already_exists(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let first = server.claim_one(&runtime).await;
    server.let_leases_expire().await;
    let second = server.claim_one(&runtime).await;
    server.start_task(&second).await.unwrap();
    let status = server.start_task(&first).await.unwrap_err();
    assert_error(&status, Code::AlreadyExists, "CLAIM_SUPERSEDED");
    let status = server.complete(&first, b"").await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "LEASE_EXPIRED");
}

async fn completing_a_task_that_was_never_started_is_refused(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    let status = server.complete(&claimed, b"").await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "TASK_NOT_STARTED");
}

async fn writes_on_a_finished_task_by_another_way_are_terminal(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    server.complete(&claimed, b"ok").await.unwrap();
    let status = server.fail(&claimed, true).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "TASK_TERMINAL");
    let status = server.start_task(&claimed).await.unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "TASK_TERMINAL");
    let stranger = uuid::Uuid::new_v4().to_string();
    let status = server
        .start_with_token(task_id(&claimed), &stranger)
        .await
        .unwrap_err();
    assert_error(&status, Code::FailedPrecondition, "TASK_TERMINAL");
}

#[sqlx::test]
async fn a_closed_database_is_unavailable_not_internal(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = Backend::Postgres(Box::new((pool, connect))).start().await;
    server.pool().close().await;
    let status = server
        .tasks
        .clone()
        .enqueue_task(task_in("q"))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unavailable, "STORE_UNAVAILABLE");
}

#[sqlx::test]
async fn internal_errors_never_carry_database_text(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = Backend::Postgres(Box::new((pool, connect))).start().await;
    let task = server.enqueue_to("q").await;
    sqlx::query("UPDATE tasks SET failure_reason = 'SECRET_GARBAGE' WHERE id = $1::uuid")
        .bind(&task.id)
        .execute(server.pool())
        .await
        .unwrap();
    let status = server
        .tasks
        .clone()
        .get_task(pb::GetTaskRequest { task_id: task.id })
        .await
        .unwrap_err();
    assert_error(&status, Code::Internal, "INTERNAL");
    assert!(!status.message().contains("SECRET_GARBAGE"));
    assert!(!status.message().contains("failure_reason"));
}

async fn a_payload_limit_above_the_transport_default_is_honoured(backend: Backend) {
    let limit = 5 * 1024 * 1024;
    let server = backend
        .start_with(|config| {
            config.max_payload_bytes = limit;
        })
        .await;
    // The response echoes the payload, so the client must accept it too.
    let mut tasks = server.tasks.clone().max_decoding_message_size(2 * limit);
    let stored = tasks
        .enqueue_task(pb::EnqueueTaskRequest {
            payload: vec![1; limit],
            ..task_in("big")
        })
        .await
        .expect("a payload at the configured limit is accepted");
    assert_eq!(stored.into_inner().task.unwrap().payload.len(), limit);
    let status = tasks
        .enqueue_task(pb::EnqueueTaskRequest {
            payload: vec![1; limit + 1],
            ..task_in("big")
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
}

async fn registering_without_a_name_or_a_valid_queue_is_invalid(backend: Backend) {
    let server = backend.start().await;
    let cases = [
        (
            "name",
            pb::RegisterRuntimeRequest {
                queues: vec!["q".into()],
                ..Default::default()
            },
        ),
        (
            "queues",
            pb::RegisterRuntimeRequest {
                name: "w".into(),
                ..Default::default()
            },
        ),
        (
            "queues",
            pb::RegisterRuntimeRequest {
                name: "w".into(),
                queues: vec!["no spaces".into()],
                ..Default::default()
            },
        ),
    ];
    for (field, request) in cases {
        let status = server
            .worker
            .clone()
            .register_runtime(request)
            .await
            .unwrap_err();
        assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(error_metadata(&status, "field").as_deref(), Some(field));
    }
}

conformance!(
    field_errors_are_invalid_field_with_bad_request_details,
    a_missing_or_malformed_claim_token_is_its_own_reason,
    unknown_tasks_and_runtimes_are_not_found,
    a_token_from_a_superseded_claim_is_refused,
    the_current_token_after_its_lease_passed_is_lease_expired,
    starting_a_task_running_under_another_token_is_already_exists,
    completing_a_task_that_was_never_started_is_refused,
    writes_on_a_finished_task_by_another_way_are_terminal,
    a_payload_limit_above_the_transport_default_is_honoured,
    registering_without_a_name_or_a_valid_queue_is_invalid,
);

fn batch_item(index: usize) -> leasehold::store::NewTask {
    leasehold::store::NewTask {
        queue: "cancelled".into(),
        payload: format!("item-{index}").into_bytes(),
        metadata: Default::default(),
        priority: 0,
        pinned_to: None,
        concurrency_key: None,
        idempotency_key: None,
        max_attempts: 3,
        delay: Duration::ZERO,
        execution_timeout: None,
    }
}

/// A caller that goes away in the middle of a batch enqueue (a client disconnect cancels its
/// handler) must not leave the pooled connection inside a transaction: sqlx's BEGIN is not
/// cancel-safe, and the next borrower's writes would run, acknowledged but uncommitted, in the
/// leaked transaction (found by the soak). One connection, so every call reuses it.
#[sqlx::test]
async fn a_cancelled_batch_enqueue_leaves_no_transaction_open(
    pool: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    // Over a link whose answers take 20 ms, a call cancelled 1–19 ms after it started is
    // waiting for BEGIN's answer: the window sqlx does not guard.
    let upstream = tokio::net::lookup_host((connect.get_host(), connect.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap();
    let slow = crate::proxy::with_latency(upstream, Duration::from_millis(20)).await;
    let pool = pool
        .max_connections(1)
        .test_before_acquire(false)
        .connect_with(connect.clone().host("127.0.0.1").port(slow.port()))
        .await
        .unwrap();
    let store = leasehold::store::postgres::PgStore::new(
        pool.clone(),
        leasehold::app::store_policy(&crate::harness::test_config()),
    );
    for attempt in 0..20_u64 {
        let budget = Duration::from_millis(1 + attempt % 19);
        let _ = tokio::time::timeout(budget, store.enqueue_batch(vec![batch_item(0)])).await;
    }
    // What a later borrower writes is committed: visible from another connection at once.
    let task = store.enqueue(batch_item(1)).await.unwrap();
    let mut observer = sqlx::PgConnection::connect_with(&connect).await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE id = $1")
        .bind(task.task.id.as_uuid())
        .fetch_one(&mut observer)
        .await
        .unwrap();
    assert_eq!(seen, 1, "a write after a cancelled batch was not committed");
    let stuck: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(&mut observer)
    .await
    .unwrap();
    assert_eq!(stuck, 0, "a connection was left inside a transaction");
}
