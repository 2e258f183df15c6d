//! Streaming claims (spec §5), long-polling claims and the drain, against real servers.

use std::time::{Duration, Instant};

use leasehold::proto as pb;
use leasehold::proto::stream_claims_request::Msg as Inbound;
use leasehold::proto::stream_claims_response::Msg as Outbound;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, eventually, status_of, task_id, task_in};
use crate::metrics::{sample, scrape};

/// Long enough that only a wake-up (never the fallback re-check) can deliver within a test.
const NO_POLLING: Duration = Duration::from_secs(3600);
/// How long a test waits for something that should come promptly.
const PROMPTLY: Duration = Duration::from_secs(2);
/// How long a test watches for something that must not come.
const QUIET: Duration = Duration::from_millis(300);

mod claim_stream;

pub use claim_stream::ClaimStream;

async fn start(backend: Backend) -> TestServer {
    backend
        .start_with(|config| {
            config.stream_poll_interval = NO_POLLING;
            config.retry_backoff_base = Duration::ZERO;
        })
        .await
}

async fn credits_bound_the_claims_in_flight(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("streamer", &["q"]).await;
    for _ in 0..5 {
        server.enqueue_to("q").await;
    }
    let mut stream = ClaimStream::open(&server, &runtime, 2).await;

    stream.next_claimed().await;
    stream.next_claimed().await;
    stream.expect_quiet().await;

    stream.grant(1).await;
    stream.next_claimed().await;
    stream.expect_quiet().await;

    let counts = server.describe_queue("q").await.counts.unwrap();
    assert_eq!((counts.dispatched, counts.queued), (3, 2));
}

/// Credits returned one by one while work is flowing are gathered into one claim (up to half
/// the window, within the linger), not claimed one statement each. Tasks claimed together
/// share their `dispatched_at`.
async fn a_flowing_stream_gathers_returned_credits(backend: Backend) {
    let server = backend
        .start_with(|config| config.stream_claim_linger = Duration::from_millis(500))
        .await;
    let runtime = server.register("gatherer", &["q"]).await;
    for _ in 0..24 {
        server.enqueue_to("q").await;
    }
    let mut stream = ClaimStream::open(&server, &runtime, 8).await;
    for _ in 0..8 {
        stream.next_claimed().await;
    }
    // Sixteen credits, each alone, further apart than a claim takes.
    let mut later = Vec::new();
    for _ in 0..16 {
        stream.grant(1).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        while let Some(Outbound::Claimed(claimed)) = stream.next(Duration::ZERO).await {
            later.push(claimed);
        }
    }
    while later.len() < 16 {
        later.push(stream.next_claimed().await);
    }
    let claim_statements: std::collections::HashSet<_> = later
        .iter()
        .map(|claimed| {
            let dispatched = claimed.task.as_ref().unwrap().dispatched_at.unwrap();
            (dispatched.seconds, dispatched.nanos)
        })
        .collect();
    // Four at a time makes 4 claims; one per credit would make 16.
    assert!(
        claim_statements.len() <= 6,
        "16 credits granted one by one took {} claims",
        claim_statements.len()
    );
}

async fn an_enqueue_wakes_a_waiting_stream(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("waiting", &["q"]).await;
    let mut stream = ClaimStream::open(&server, &runtime, 1).await;
    stream.expect_quiet().await;

    let task = server.enqueue_to("q").await;
    let claimed = stream.next_claimed().await;

    assert_eq!(task_id(&claimed), task.id);
}

/// One enqueued task wakes one of many idle streams on its queue, not all of them (each would
/// run a claim in the store, and all but one would find nothing).
async fn an_enqueue_wakes_one_idle_stream_not_all(backend: Backend) {
    let address = format!("127.0.0.1:{}", crate::harness::free_port());
    let server = backend
        .start_with(|config| {
            config.stream_poll_interval = NO_POLLING;
            config.metrics_listen = Some(address.parse().unwrap());
        })
        .await;
    let mut streams = Vec::new();
    for index in 0..6 {
        let runtime = server.register(&format!("idle-{index}"), &["herd"]).await;
        streams.push(ClaimStream::open(&server, &runtime, 1).await);
    }
    // Every stream has made its first (empty) claim and waits.
    let store_claims =
        r#"leasehold_store_call_duration_seconds_count{operation="claim",outcome="ok"}"#;
    // The exporter starts listening in the background.
    tokio::time::sleep(QUIET).await;
    let waited = Instant::now();
    let mut before = sample(&scrape(&address).await, store_claims);
    while before < 6.0 && waited.elapsed() < PROMPTLY * 5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        before = sample(&scrape(&address).await, store_claims);
    }
    assert_eq!(before, 6.0, "each stream's first claim");

    let task = server.enqueue_to("herd").await;
    let mut claimed = Vec::new();
    for stream in &mut streams {
        if let Some(Outbound::Claimed(claim)) = stream.next(QUIET).await {
            claimed.push(claim);
        }
    }
    let after = sample(&scrape(&address).await, store_claims);

    assert_eq!(claimed.len(), 1);
    assert_eq!(task_id(&claimed[0]), task.id);
    assert_eq!(after - before, 1.0, "claims run for one enqueued task");
}

async fn a_delayed_task_wakes_a_stream_when_it_comes_due(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("early", &["q"]).await;
    let mut stream = ClaimStream::open(&server, &runtime, 1).await;
    let task = server
        .enqueue(pb::EnqueueTaskRequest {
            delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 300_000_000,
            }),
            ..task_in("q")
        })
        .await;
    let enqueued_at = Instant::now();

    let claimed = stream.next_claimed().await;

    assert_eq!(task_id(&claimed), task.id);
    assert!(enqueued_at.elapsed() >= Duration::from_millis(250));
}

async fn an_idle_stream_hears_keepalives(backend: Backend) {
    let server = backend
        .start_with(|config| config.stream_keepalive = Duration::from_millis(100))
        .await;
    let runtime = server.register("idle", &["q"]).await;
    let mut stream = ClaimStream::open(&server, &runtime, 1).await;

    let messages = stream.raw_messages(Duration::from_millis(650)).await;

    let keepalives = messages
        .iter()
        .filter(
            |message| matches!(message, Outbound::Keepalive(beat) if beat.server_time.is_some()),
        )
        .count();
    assert!(keepalives >= 3, "{messages:?}");
}

/// Spec §2 T4': streams opened with many credits and closed again, more often than the poison
/// guard allows, fail nothing: every task is still QUEUED, on its first attempt.
async fn flapping_streams_fail_no_task(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("flapping", &["q"]).await;
    let task = server.enqueue_to("q").await;
    for _ in 0..7 {
        let mut stream = ClaimStream::open(&server, &runtime, 1000).await;
        let claimed = stream.next_claimed().await;
        assert_eq!(task_id(&claimed), task.id);
        drop(stream);
        wait_for_status(&server, &task.id, pb::TaskStatus::Queued).await;
    }
    let task = server.get_task(&task.id).await;
    assert_eq!(
        (status_of(&task), task.attempt, task.lease_expirations),
        (pb::TaskStatus::Queued, 1, 0)
    );
}

/// `auto_start`: claims arrive RUNNING, started by the claim. CompleteTask needs no StartTask; a
/// StartTask with the token is an accepted replay; a broken stream gives none of them back.
async fn an_auto_start_stream_pushes_started_claims(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("eager", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let open = Inbound::Open(pb::OpenStream {
        runtime_id: runtime.clone(),
        credits: 2,
        auto_start: true,
    });
    let mut stream = ClaimStream::start(server.worker.clone(), open)
        .await
        .unwrap();
    let completed = stream.next_claimed().await;
    let running = stream.next_claimed().await;
    for claimed in [&completed, &running] {
        let task = server.get_task(task_id(claimed)).await;
        assert_eq!(status_of(&task), pb::TaskStatus::Running);
        assert!(task.started_at.is_some());
        assert_eq!(task.claimed_by, runtime);
    }

    let done = server.complete(&completed, b"ok").await.unwrap();
    assert_eq!(status_of(&done), pb::TaskStatus::Completed);
    let replayed = server.start_task(&running).await.unwrap();
    assert_eq!(status_of(&replayed), pb::TaskStatus::Running);
    let extend = server
        .worker
        .clone()
        .extend_lease(pb::ExtendLeaseRequest {
            task_id: task_id(&running).into(),
            claim_token: running.claim_token.clone(),
            extend_by: None,
        })
        .await
        .unwrap_err();
    assert_error(&extend, Code::FailedPrecondition, "TASK_ALREADY_STARTED");

    drop(stream);
    // A broken stream gives back its unstarted claims within milliseconds (the test above);
    // a started one stays with its worker, whose token still completes it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = server.complete(&running, b"ok").await.unwrap();
    assert_eq!(status_of(&done), pb::TaskStatus::Completed);
}

async fn a_broken_stream_gives_back_its_unstarted_claims(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("fragile", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let mut stream = ClaimStream::open(&server, &runtime, 2).await;
    let started = stream.next_claimed().await;
    let unstarted = stream.next_claimed().await;
    server.start_task(&started).await.unwrap();

    drop(stream);

    let requeued = wait_for_status(&server, task_id(&unstarted), pb::TaskStatus::Queued).await;
    assert_eq!(
        requeued.lease_expirations, 0,
        "a stream break is not a lease expiry for the poison guard"
    );
    let late = server.start_task(&unstarted).await.unwrap_err();
    assert_error(&late, Code::FailedPrecondition, "LEASE_EXPIRED");
    let running = server.get_task(task_id(&started)).await;
    assert_eq!(status_of(&running), pb::TaskStatus::Running);
}

async fn a_cancellation_reaches_the_holding_stream(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("holder", &["q"]).await;
    server.enqueue_to("q").await;
    let mut stream = ClaimStream::open(&server, &runtime, 1).await;
    let claimed = stream.next_claimed().await;
    server.start_task(&claimed).await.unwrap();

    server
        .tasks
        .clone()
        .cancel_task(pb::CancelTaskRequest {
            task_id: task_id(&claimed).into(),
        })
        .await
        .unwrap();

    match stream.next(PROMPTLY).await {
        Some(Outbound::Cancelled(cancelled)) => assert_eq!(cancelled.task_id, task_id(&claimed)),
        other => panic!("expected a cancellation, got {other:?}"),
    }
}

async fn a_stream_must_open_for_a_known_runtime(backend: Backend) {
    let server = start(backend).await;
    let credit_first = ClaimStream::start(
        server.worker.clone(),
        Inbound::Credit(pb::GrantCredit { n: 1 }),
    )
    .await
    .err()
    .expect("a stream that does not open is refused");
    assert_error(&credit_first, Code::InvalidArgument, "INVALID_FIELD");

    let unknown = ClaimStream::try_open(&server, &uuid::Uuid::new_v4().to_string(), 1)
        .await
        .err()
        .expect("an unknown runtime is refused");
    assert_error(&unknown, Code::NotFound, "RUNTIME_NOT_FOUND");
}

async fn a_long_poll_returns_as_soon_as_a_task_is_enqueued(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("patient", &["q"]).await;
    let mut worker = server.worker.clone();
    let started = Instant::now();
    let waiting = tokio::spawn({
        let runtime = runtime.clone();
        async move {
            worker
                .claim_task(pb::ClaimTaskRequest {
                    runtime_id: runtime,
                    max_tasks: Some(1),
                    wait: Some(crate::harness::wire_millis(20000)),
                })
                .await
                .unwrap()
                .into_inner()
                .tasks
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let task = server.enqueue_to("q").await;

    let claimed = waiting.await.unwrap();

    assert_eq!(claimed.len(), 1);
    assert_eq!(task_id(&claimed[0]), task.id);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

async fn a_long_poll_ends_empty_before_the_callers_deadline(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("bounded", &["q"]).await;
    let mut request = tonic::Request::new(pb::ClaimTaskRequest {
        runtime_id: runtime.clone(),
        max_tasks: Some(1),
        wait: Some(crate::harness::wire_millis(10000)),
    });
    request.set_timeout(Duration::from_millis(600));
    let started = Instant::now();

    let response = server.worker.clone().claim_task(request).await.unwrap();

    assert!(response.into_inner().tasks.is_empty());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    assert!(waited < Duration::from_millis(600), "{waited:?}");
}

async fn draining_tells_streams_and_gives_back_their_claims(backend: Backend) {
    let mut server = start(backend).await;
    let runtime = server.register("drained", &["q"]).await;
    server.enqueue_to("q").await;
    let mut stream = ClaimStream::open(&server, &runtime, 1).await;
    let claimed = stream.next_claimed().await;
    let store = server.store();

    server.begin_shutdown();

    match stream.next(PROMPTLY).await {
        Some(Outbound::Draining(_)) => {}
        other => panic!("expected draining, got {other:?}"),
    }
    assert!(
        stream.next(PROMPTLY).await.is_none(),
        "the stream ends after draining"
    );
    let task = store
        .get_task(leasehold::domain::TaskId::parse(task_id(&claimed)).unwrap())
        .await
        .unwrap();
    assert_eq!(task.status, leasehold::domain::TaskStatus::Queued);
}

conformance!(
    credits_bound_the_claims_in_flight,
    flapping_streams_fail_no_task,
    a_flowing_stream_gathers_returned_credits,
    an_enqueue_wakes_one_idle_stream_not_all,
    an_enqueue_wakes_a_waiting_stream,
    a_delayed_task_wakes_a_stream_when_it_comes_due,
    an_idle_stream_hears_keepalives,
    a_broken_stream_gives_back_its_unstarted_claims,
    an_auto_start_stream_pushes_started_claims,
    a_cancellation_reaches_the_holding_stream,
    a_stream_must_open_for_a_known_runtime,
    a_long_poll_returns_as_soon_as_a_task_is_enqueued,
    a_long_poll_ends_empty_before_the_callers_deadline,
    draining_tells_streams_and_gives_back_their_claims,
);

/// The task in `status`, promptly (a stream delivers at once, or not at all).
async fn wait_for_status(server: &TestServer, task_id: &str, status: pb::TaskStatus) -> pb::Task {
    let what = format!("task {task_id} is {status:?}");
    eventually(&what, Duration::from_secs(1), async || {
        let task = server.get_task(task_id).await;
        (status_of(&task) == status).then_some(task)
    })
    .await
}

mod replicas;
mod writes;
