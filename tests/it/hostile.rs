//! Hostile and faulty clients (spec §10): input that once stopped or stranded something gets a
//! typed error (or, for a worker's failure text, is cleaned and stored), and a stage of the
//! sweeper that fails does not stop the others.

use std::collections::HashMap;
use std::time::Duration;

use leasehold::proto as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{
    Backend, EVENTUALLY, TestServer, assert_error, eventually, status_of, task_id, task_in,
};

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

/// 20 concurrent claims by one runtime with `max_concurrency` 3 hold 3 tasks at most; a
/// finished one frees its slot.
async fn racing_claims_never_exceed_max_concurrency(backend: Backend) {
    let server = backend.start().await;
    let runtime = register_capped(&server, "capped", 3).await;
    for _ in 0..30 {
        server.enqueue_to("q").await;
    }

    let claims = (0..20).map(|_| server.claim(&runtime, Some(2)));
    let claimed: Vec<pb::ClaimedTask> = futures::future::join_all(claims)
        .await
        .into_iter()
        .flatten()
        .collect();

    assert_eq!(claimed.len(), 3, "claimed {} tasks", claimed.len());
    assert!(server.claim(&runtime, Some(5)).await.is_empty());
    server.start_task(&claimed[0]).await.unwrap();
    server.complete(&claimed[0], b"done").await.unwrap();
    assert_eq!(server.claim(&runtime, Some(5)).await.len(), 1);
}

conformance!(
    out_of_range_input_is_refused_with_invalid_field,
    a_failure_report_with_any_text_is_stored,
    racing_claims_never_exceed_max_concurrency,
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

/// At most `--max-streams-per-runtime` claim streams per runtime; the next is refused until
/// one closes.
async fn a_runtime_holds_at_most_four_streams(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("greedy", &["q"]).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(crate::streams::ClaimStream::open(&server, &runtime, 1).await);
    }

    let refused = crate::streams::ClaimStream::try_open(&server, &runtime, 1)
        .await
        .err()
        .expect("a fifth stream was opened");

    assert_error(&refused, Code::ResourceExhausted, "TOO_MANY_STREAMS");
    drop(open.pop());
    eventually("a closed stream's slot is freed", EVENTUALLY, async || {
        crate::streams::ClaimStream::try_open(&server, &runtime, 1)
            .await
            .ok()
    })
    .await;
}

/// Credits are capped at 1,000 however many a worker asks for.
async fn stream_credits_are_capped_at_a_thousand(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("hungry", &["q"]).await;
    for _ in 0..2 {
        let requests = (0..550).map(|_| task_in("q")).collect();
        server
            .tasks
            .clone()
            .enqueue_tasks(pb::EnqueueTasksRequest { requests })
            .await
            .unwrap();
    }
    let mut stream = crate::streams::ClaimStream::open(&server, &runtime, u32::MAX).await;

    let mut pushed = 0;
    while let Some(pb::stream_claims_response::Msg::Claimed(_)) =
        stream.next(Duration::from_millis(1500)).await
    {
        pushed += 1;
    }

    assert_eq!(pushed, 1000);
}

conformance!(
    a_runtime_holds_at_most_four_streams,
    stream_credits_are_capped_at_a_thousand,
);

/// A stream whose first message never comes is ended after 10 s.
#[tokio::test]
async fn a_stream_without_its_open_message_is_ended() {
    let server = Backend::Memory.start().await;
    let (_keep, silent) = tokio::sync::mpsc::channel::<pb::StreamClaimsRequest>(1);
    let opened = tokio::time::timeout(
        Duration::from_secs(15),
        server
            .worker
            .clone()
            .stream_claims(tokio_stream::wrappers::ReceiverStream::new(silent)),
    )
    .await
    .expect("the server kept waiting for the open message");

    assert_error(&opened.unwrap_err(), Code::InvalidArgument, "INVALID_FIELD");
}

/// Past `--max-inflight-calls`, a call is refused at once with OVERLOADED and a RetryInfo;
/// health checks are not shed.
#[tokio::test]
async fn calls_beyond_the_in_flight_limit_are_shed() {
    use tonic_types::StatusExt as _;
    let server = Backend::Memory
        .start_with(|config| config.max_inflight_calls = 1)
        .await;
    let runtime = server.register("waiting", &["q"]).await;
    let mut worker = server.worker.clone();
    let long_poll = tokio::spawn(async move {
        worker
            .claim_task(pb::ClaimTaskRequest {
                runtime_id: runtime,
                max_tasks: Some(1),
                wait: Some(seconds(2)),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let shed = refused_enqueue(&server, task_in("q")).await;

    assert_error(&shed, Code::ResourceExhausted, "OVERLOADED");
    assert!(shed.get_details_retry_info().is_some(), "no RetryInfo");
    let health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "a health check was shed");
    long_poll.await.unwrap().unwrap();
    assert!(
        server
            .tasks
            .clone()
            .enqueue_task(task_in("q"))
            .await
            .is_ok()
    );
}

/// No ListTasks page exceeds the 4 MiB a gRPC client accepts by default: a page of large
/// tasks ends early and its token continues where it stopped.
async fn large_tasks_come_in_pages_under_four_mebibytes(backend: Backend) {
    let server = backend.start().await;
    let mut enqueued = Vec::new();
    for index in 0..6 {
        let task = server
            .enqueue(pb::EnqueueTaskRequest {
                payload: vec![index; 900 * 1024],
                ..task_in("big")
            })
            .await;
        enqueued.push(task.id);
    }
    let list = |page_token: String| pb::ListTasksRequest {
        queue: "big".into(),
        page_size: 100,
        page_token,
        ..Default::default()
    };

    let first = server
        .tasks
        .clone()
        .list_tasks(list(String::new()))
        .await
        .expect("a page within the client's limit")
        .into_inner();
    assert_eq!(first.tasks.len(), 4);
    assert!(!first.next_page_token.is_empty());
    let second = server
        .tasks
        .clone()
        .list_tasks(list(first.next_page_token))
        .await
        .unwrap()
        .into_inner();

    let listed: Vec<String> = first
        .tasks
        .iter()
        .chain(&second.tasks)
        .map(|task| task.id.clone())
        .collect();
    assert_eq!(listed, enqueued);
}

conformance!(large_tasks_come_in_pages_under_four_mebibytes);

/// A stream's credits are clamped to the runtime's free `max_concurrency` at open: with 2
/// allowed and 1 held, 100 credits are 1, so one claim is pushed, and when the held task
/// finishes nothing more comes until the worker grants a credit.
async fn a_stream_gets_no_more_than_the_free_slots(backend: Backend) {
    let server = backend.start().await;
    let runtime = register_capped(&server, "small", 2).await;
    for _ in 0..10 {
        server.enqueue_to("q").await;
    }
    let held = server.claim_one(&runtime).await;
    server.start_task(&held).await.unwrap();
    let mut stream = crate::streams::ClaimStream::open(&server, &runtime, 100).await;

    let mut pushed = 0;
    while let Some(pb::stream_claims_response::Msg::Claimed(_)) =
        stream.next(Duration::from_millis(700)).await
    {
        pushed += 1;
    }
    assert_eq!(pushed, 1);

    server.complete(&held, b"done").await.unwrap();
    assert!(
        stream.next(Duration::from_millis(700)).await.is_none(),
        "a claim was pushed without a credit"
    );
    stream.grant(1).await;
    assert!(matches!(
        stream.next(Duration::from_secs(3)).await,
        Some(pb::stream_claims_response::Msg::Claimed(_))
    ));
}

conformance!(a_stream_gets_no_more_than_the_free_slots);

/// HTTP/2 allows 256 concurrent streams per connection: 300 long-polls on one connection
/// reach the server at most 256 at a time, so with a limit of 257 calls in progress none is
/// shed. (Without the HTTP/2 limit, all 300 would be in progress at once.)
#[tokio::test]
async fn one_connection_holds_at_most_256_calls_in_progress() {
    let server = Backend::Memory
        .start_with(|config| config.max_inflight_calls = 257)
        .await;
    let runtime = server.register("patient", &["nothing-here"]).await;
    let calls = (0..300).map(|_| {
        let mut worker = server.worker.clone();
        let runtime_id = runtime.clone();
        async move {
            worker
                .claim_task(pb::ClaimTaskRequest {
                    runtime_id,
                    max_tasks: Some(1),
                    wait: Some(seconds(1)),
                })
                .await
        }
    });

    let answers = futures::future::join_all(calls).await;

    let shed = answers.iter().filter(|answer| answer.is_err()).count();
    assert_eq!(
        shed,
        0,
        "{:?}",
        answers.iter().find(|answer| answer.is_err())
    );
}

/// A runtime serving `q` with this `max_concurrency`; its id.
async fn register_capped(server: &TestServer, name: &str, max_concurrency: u32) -> String {
    server
        .worker
        .clone()
        .register_runtime(pb::RegisterRuntimeRequest {
            name: name.into(),
            queues: vec!["q".into()],
            labels: Default::default(),
            max_concurrency,
        })
        .await
        .unwrap()
        .into_inner()
        .runtime
        .unwrap()
        .id
}
