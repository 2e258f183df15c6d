//! Hostile and faulty clients (spec §10): input that once stopped or stranded something gets a
//! typed error (or, for a worker's failure text, is cleaned and stored), and a stage of the
//! sweeper that fails does not stop the others.

use std::collections::HashMap;
use std::time::Duration;

use leasehold::grpc::pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, status_of, task_id, task_in};

fn seconds(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

async fn refused_enqueue(server: &TestServer, request: pb::EnqueueTaskRequest) -> tonic::Status {
    server
        .tasks
        .clone()
        .enqueue_task(request)
        .await
        .expect_err("the enqueue was accepted")
}

async fn out_of_range_input_is_refused_with_invalid_field(backend: Backend) {
    let server = backend.start().await;
    let year_and_a_day = 366 * 24 * 60 * 60;
    for request in [
        pb::EnqueueTaskRequest {
            execution_timeout: Some(seconds(10_000_000_000_000)),
            ..task_in("q")
        },
        pb::EnqueueTaskRequest {
            delay: Some(seconds(year_and_a_day)),
            ..task_in("q")
        },
        pb::EnqueueTaskRequest {
            metadata: HashMap::from([("to".into(), "a\0b".into())]),
            ..task_in("q")
        },
        pb::EnqueueTaskRequest {
            metadata: (0..65)
                .map(|index| (index.to_string(), String::new()))
                .collect(),
            ..task_in("q")
        },
        pb::EnqueueTaskRequest {
            concurrency_key: "key\0".into(),
            ..task_in("q")
        },
    ] {
        let refused = refused_enqueue(&server, request).await;
        assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
    }
    let too_many_queues: Vec<String> = (0..65).map(|index| format!("q{index}")).collect();
    let refused = server
        .worker
        .clone()
        .register_runtime(pb::RegisterRuntimeRequest {
            name: "greedy".into(),
            queues: too_many_queues,
            labels: Default::default(),
            max_concurrency: 1,
        })
        .await
        .unwrap_err();
    assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
    let refused = server
        .worker
        .clone()
        .register_runtime(pb::RegisterRuntimeRequest {
            name: "nul\0name".into(),
            queues: vec!["q".into()],
            labels: Default::default(),
            max_concurrency: 1,
        })
        .await
        .unwrap_err();
    assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
    // Nothing was stored.
    let listed = server
        .tasks
        .clone()
        .list_tasks(pb::ListTasksRequest {
            queue: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.tasks.is_empty());
}

/// A worker's failure report is never refused for its text: a refusal would leave the task
/// RUNNING with its slot held. NUL is replaced, and text over the limit keeps its end.
async fn a_failure_report_with_any_text_is_stored(backend: Backend) {
    let server = backend
        .start_with(|config| config.max_payload_bytes = 1024)
        .await;
    let runtime = server.register("careless", &["q"]).await;
    server
        .enqueue(pb::EnqueueTaskRequest {
            max_attempts: 1,
            ..task_in("q")
        })
        .await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    let error = format!("{}\0the real cause", "noise ".repeat(1000));

    let failed = server
        .worker
        .clone()
        .fail_task(pb::FailTaskRequest {
            task_id: task_id(&claimed).into(),
            claim_token: claimed.claim_token.clone(),
            error,
            retryable: false,
        })
        .await
        .expect("the failure was stored")
        .into_inner()
        .task
        .unwrap();

    assert_eq!(status_of(&failed), pb::TaskStatus::Failed);
    assert!(failed.error.len() <= 1024);
    assert!(
        failed.error.ends_with("\u{FFFD}the real cause"),
        "{}",
        failed.error
    );
}

conformance!(
    out_of_range_input_is_refused_with_invalid_field,
    a_failure_report_with_any_text_is_stored,
);

/// A row the server no longer accepts (an execution timeout of 10^13 s, stored before the
/// 365-day cap) makes the execution-timeout statement fail on every sweep; the stages after
/// it (here: a pinned task of a runtime gone for longer than the grace) still run.
#[sqlx::test]
async fn a_failing_sweeper_stage_does_not_stop_the_others(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let runtime = server.register("worker", &["q"]).await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    server.start_task(&claimed).await.unwrap();
    let id = uuid::Uuid::parse_str(task_id(&claimed)).unwrap();
    sqlx::query("UPDATE tasks SET execution_timeout_ms = 10000000000000000 WHERE id = $1")
        .bind(id)
        .execute(server.pool())
        .await
        .unwrap();
    let gone = server.register("gone", &["p"]).await;
    let pinned = server
        .enqueue(pb::EnqueueTaskRequest {
            runtime_id: gone.clone(),
            ..task_in("p")
        })
        .await;
    server.deregister(&gone).await;
    server.advance_time(Duration::from_secs(3601)).await;
    server.heartbeat(&runtime).await;

    let report = server.sweep().await;

    assert_eq!(report.runtime_gone.len(), 1);
    let pinned = server.get_task(&pinned.id).await;
    assert_eq!(pinned.failure_reason(), pb::FailureReason::RuntimeGone);
    let running = server.get_task(task_id(&claimed)).await;
    assert_eq!(status_of(&running), pb::TaskStatus::Running);
}

/// A database that only accepts reads (a standby after a failover) makes writes UNAVAILABLE,
/// which clients retry, not INTERNAL, which they treat as final.
#[sqlx::test]
async fn a_read_only_database_is_unavailable(pool: PgPoolOptions, connect: PgConnectOptions) {
    let read_only = connect.options([("default_transaction_read_only", "on")]);
    let server = TestServer::start(pool, read_only).await;

    let refused = refused_enqueue(&server, task_in("q")).await;

    assert_error(&refused, Code::Unavailable, "STORE_UNAVAILABLE");
}

/// Every pooled connection carries a `statement_timeout` and a `lock_timeout`.
#[tokio::test]
async fn pooled_connections_have_statement_and_lock_timeouts() {
    use sqlx::Connection as _;
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let mut config = crate::harness::test_config();
    config.database_statement_timeout = Duration::from_secs(7);
    config.database_lock_timeout = Duration::from_millis(1500);
    let options = leasehold::app::connect_options(&url, &config).unwrap();
    let mut connection = sqlx::PgConnection::connect_with(&options).await.unwrap();

    let statement: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    let lock: String = sqlx::query_scalar("SHOW lock_timeout")
        .fetch_one(&mut connection)
        .await
        .unwrap();

    assert_eq!((statement.as_str(), lock.as_str()), ("7s", "1500ms"));
}
