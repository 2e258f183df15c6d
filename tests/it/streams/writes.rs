//! Task writes carried on the claim stream (`StreamWrite` → `StreamWritten`): each is the unary
//! call's — the same outcome, the same refusals with the same reasons — answered under the
//! worker's request_id, with credits granted along.

use leasehold::grpc::status::status_from_rpc;
use tonic::{Code, Status};

use super::{ClaimStream, PROMPTLY, start};
use crate::harness::{Backend, TestServer, assert_error, status_of, task_id};
use leasehold::proto::stream_claims_request::Msg as Inbound;
use leasehold::proto::stream_claims_response::Msg as Outbound;
use leasehold::proto::{self as pb, stream_write::Call};

fn start_call(claimed: &pb::ClaimedTask) -> Call {
    Call::Start(pb::StartTaskRequest {
        task_id: task_id(claimed).into(),
        claim_token: claimed.claim_token.clone(),
    })
}

fn complete_call(task_id: &str, claim_token: &str, result: &[u8]) -> Call {
    Call::Complete(pb::CompleteTaskRequest {
        task_id: task_id.into(),
        claim_token: claim_token.into(),
        result: result.to_vec(),
    })
}

fn fail_call(claimed: &pb::ClaimedTask, error: &str) -> Call {
    Call::Fail(pb::FailTaskRequest {
        task_id: task_id(claimed).into(),
        claim_token: claimed.claim_token.clone(),
        error: error.into(),
        retryable: false,
    })
}

/// Sends `call` as write `request_id` (granting `credit`) and returns its answer.
async fn write(
    stream: &mut ClaimStream,
    request_id: u64,
    call: Option<Call>,
    credit: u32,
) -> pb::StreamWritten {
    let write = pb::StreamWrite {
        request_id,
        call,
        credit,
    };
    stream.send(Inbound::Write(write)).await;
    match stream.next(PROMPTLY).await {
        Some(Outbound::Written(written)) => {
            assert_eq!(written.request_id, request_id, "the answer names its write");
            written
        }
        other => panic!("expected the answer to write {request_id}, got {other:?}"),
    }
}

/// The refusal an answer carries, as the tonic status the unary call would have returned.
fn refusal(written: &pb::StreamWritten) -> Status {
    let error = written.error.clone().expect("a refusal");
    assert!(written.task.is_none(), "a refusal carries no task");
    status_from_rpc(error)
}

/// A stream of one credit whose claims arrive started.
async fn auto_starting_stream(server: &TestServer, runtime_id: &str) -> ClaimStream {
    let open = Inbound::Open(pb::OpenStream {
        runtime_id: runtime_id.into(),
        credits: 1,
        auto_start: true,
    });
    ClaimStream::start(server.worker.clone(), open)
        .await
        .unwrap()
}

fn written_task(written: &pb::StreamWritten) -> &pb::Task {
    assert!(written.error.is_none(), "refused: {:?}", written.error);
    written.task.as_ref().expect("the written task")
}

async fn writes_on_the_stream_start_complete_and_fail_as_the_calls_do(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("writer", &["q"]).await;
    for _ in 0..3 {
        server.enqueue_to("q").await;
    }
    let mut stream = ClaimStream::open(&server, &runtime, 3).await;
    let (done, failed, other) = (
        stream.next_claimed().await,
        stream.next_claimed().await,
        stream.next_claimed().await,
    );

    let started = write(&mut stream, 1, Some(start_call(&done)), 0).await;
    assert_eq!(status_of(written_task(&started)), pb::TaskStatus::Running);
    // A replayed start is accepted, as the call's is.
    let replayed = write(&mut stream, 2, Some(start_call(&done)), 0).await;
    assert_eq!(status_of(written_task(&replayed)), pb::TaskStatus::Running);
    let call = complete_call(task_id(&done), &done.claim_token, b"done");
    let completed = write(&mut stream, 3, Some(call), 0).await;
    assert_eq!(
        status_of(written_task(&completed)),
        pb::TaskStatus::Completed
    );
    assert_eq!(server.get_task(task_id(&done)).await.result, b"done");

    let gave_up = write(&mut stream, 4, Some(fail_call(&failed, "boom")), 0).await;
    assert_eq!(status_of(written_task(&gave_up)), pb::TaskStatus::Failed);
    assert!(!gave_up.will_retry);

    // Refusals: the unary call's code and reason, and the stream goes on.
    let never_started = complete_call(task_id(&other), &other.claim_token, b"");
    let refused = write(&mut stream, 5, Some(never_started.clone()), 0).await;
    let Call::Complete(unary) = never_started else {
        unreachable!()
    };
    let unary = server
        .worker
        .clone()
        .complete_task(unary)
        .await
        .unwrap_err();
    assert_error(&unary, Code::FailedPrecondition, "TASK_NOT_STARTED");
    assert_error(
        &refusal(&refused),
        Code::FailedPrecondition,
        "TASK_NOT_STARTED",
    );

    let superseded = uuid::Uuid::new_v4().to_string();
    let call = complete_call(task_id(&done), &superseded, b"");
    let terminal = write(&mut stream, 6, Some(call), 0).await;
    assert_error(
        &refusal(&terminal),
        Code::FailedPrecondition,
        "TASK_TERMINAL",
    );
    let call = complete_call("not-a-uuid", &other.claim_token, b"");
    let malformed = write(&mut stream, 7, Some(call), 0).await;
    assert_error(&refusal(&malformed), Code::InvalidArgument, "INVALID_FIELD");
    let empty = write(&mut stream, 8, None, 0).await;
    assert_error(&refusal(&empty), Code::InvalidArgument, "INVALID_FIELD");

    let still = write(&mut stream, 9, Some(start_call(&other)), 0).await;
    assert_eq!(status_of(written_task(&still)), pb::TaskStatus::Running);
}

/// A write's `credit` grants as a `credit` message does: completing the only claim with one
/// credit brings the next task.
async fn a_write_grants_its_credits(backend: Backend) {
    let server = start(backend).await;
    let runtime = server.register("recycler", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let mut stream = auto_starting_stream(&server, &runtime).await;
    let first = stream.next_claimed().await;
    stream.expect_quiet().await;

    let call = complete_call(task_id(&first), &first.claim_token, b"");
    let write = pb::StreamWrite {
        request_id: 1,
        call: Some(call),
        credit: 1,
    };
    stream.send(Inbound::Write(write)).await;
    let mut answered = false;
    let mut next = None;
    while !(answered && next.is_some()) {
        match stream.next(PROMPTLY).await {
            Some(Outbound::Written(written)) => {
                assert_eq!(status_of(written_task(&written)), pb::TaskStatus::Completed);
                answered = true;
            }
            Some(Outbound::Claimed(claimed)) => next = Some(claimed),
            other => panic!("expected the answer and the next claim, got {other:?}"),
        }
    }
    assert_ne!(task_id(next.as_ref().unwrap()), task_id(&first));
}

conformance!(
    writes_on_the_stream_start_complete_and_fail_as_the_calls_do,
    a_write_grants_its_credits,
);

/// A stream holds at most 256 writes at once (spec §10); one more is refused at once with
/// OVERLOADED, and the others are answered when they can be. (PostgreSQL: the test holds the
/// task's row so that the writes stay in flight.)
#[sqlx::test]
async fn a_stream_holds_a_bounded_number_of_writes(
    pool: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    use sqlx::Connection as _;
    let server = TestServer::start(pool, connect.clone()).await;
    let runtime = server.register("flooder", &["q"]).await;
    server.enqueue_to("q").await;
    let mut stream = auto_starting_stream(&server, &runtime).await;
    let claimed = stream.next_claimed().await;
    let mut holder = sqlx::PgConnection::connect_with(&connect).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1::uuid FOR UPDATE")
        .bind(task_id(&claimed))
        .execute(&mut holder)
        .await
        .unwrap();

    const LIMIT: u64 = 256;
    for request_id in 1..=LIMIT + 1 {
        let call = complete_call(task_id(&claimed), &claimed.claim_token, b"");
        let write = pb::StreamWrite {
            request_id,
            call: Some(call),
            credit: 0,
        };
        stream.send(Inbound::Write(write)).await;
    }
    match stream.next(PROMPTLY).await {
        Some(Outbound::Written(written)) => {
            assert_eq!(written.request_id, LIMIT + 1, "the write over the limit");
            assert_error(&refusal(&written), Code::ResourceExhausted, "OVERLOADED");
        }
        other => panic!("expected the refusal of the write over the limit, got {other:?}"),
    }
    stream.expect_quiet().await;

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let mut answered = std::collections::HashSet::new();
    while answered.len() < LIMIT as usize {
        match stream.next(std::time::Duration::from_secs(10)).await {
            // The first completes the task; the others are its replays.
            Some(Outbound::Written(written)) => {
                assert_eq!(status_of(written_task(&written)), pb::TaskStatus::Completed);
                answered.insert(written.request_id);
            }
            other => panic!("expected the held writes' answers, got {other:?}"),
        }
    }
}
