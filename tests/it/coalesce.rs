//! Concurrent StartTask and CompleteTask calls share statements in PostgreSQL (group commit),
//! and every write in a shared statement is still judged by its own token.

use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{TestServer, assert_error, status_of, task_id};
use leasehold::proto::{self as pb, TaskStatus};

const TASKS: usize = 32;

/// `TASKS` tasks of `queue`, claimed by one runtime.
async fn claimed_tasks(server: &TestServer, queue: &str) -> Vec<pb::ClaimedTask> {
    let runtime = server.register("coalescer", &[queue]).await;
    for _ in 0..TASKS {
        server.enqueue_to(queue).await;
    }
    let claimed = server
        .claim(&runtime, Some(u32::try_from(TASKS).unwrap()))
        .await;
    assert_eq!(claimed.len(), TASKS);
    claimed
}

/// How many statements wrote the queue's tasks, told by the distinct `now()` they recorded:
/// rows written by one statement share its transaction's `now()`; separate statements do not.
const STARTS: &str = "SELECT count(DISTINCT started_at) FROM tasks WHERE queue = $1";
const COMPLETES: &str = "SELECT count(DISTINCT finished_at) FROM tasks WHERE queue = $1";

async fn statements(server: &TestServer, queue: &str, count: &'static str) -> i64 {
    sqlx::query_scalar(count)
        .bind(queue)
        .fetch_one(server.pool())
        .await
        .unwrap()
}

#[sqlx::test]
async fn concurrent_starts_and_completes_share_statements(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let claimed = claimed_tasks(&server, "shared").await;

    let started = join_all(claimed.iter().map(|claim| server.start_task(claim))).await;
    for task in started {
        assert_eq!(status_of(&task.unwrap()), TaskStatus::Running);
    }
    // Each task completes with its own id as the result, so a row answered to the wrong
    // caller, or written with another's result, shows.
    let completed = join_all(
        claimed
            .iter()
            .map(|claim| server.complete(claim, task_id(claim).as_bytes())),
    )
    .await;
    for (claim, task) in claimed.iter().zip(completed) {
        let task = task.unwrap();
        assert_eq!(task.id, task_id(claim));
        assert_eq!(status_of(&task), TaskStatus::Completed);
        let stored = server.get_task(task_id(claim)).await;
        assert_eq!(stored.result, task_id(claim).as_bytes());
    }

    let start_statements = statements(&server, "shared", STARTS).await;
    let complete_statements = statements(&server, "shared", COMPLETES).await;
    assert!(
        start_statements <= (TASKS / 2) as i64,
        "{TASKS} concurrent starts took {start_statements} statements"
    );
    assert!(
        complete_statements <= (TASKS / 2) as i64,
        "{TASKS} concurrent completes took {complete_statements} statements"
    );
}

#[sqlx::test]
async fn each_write_in_a_shared_statement_is_judged_by_its_own_token(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let claimed = claimed_tasks(&server, "judged").await;
    let stale_token = uuid::Uuid::new_v4().to_string();

    // Even tasks: started twice with their token (a retry racing its first try). Odd tasks:
    // started with a token that never held them. All at once.
    let attempts = claimed.iter().enumerate().flat_map(|(index, claim)| {
        let id = task_id(claim);
        if index % 2 == 0 {
            vec![
                server.start_with_token(id, &claim.claim_token),
                server.start_with_token(id, &claim.claim_token),
            ]
        } else {
            vec![server.start_with_token(id, &stale_token)]
        }
    });
    let outcomes = join_all(attempts).await;

    let mut outcomes = outcomes.into_iter();
    for (index, claim) in claimed.iter().enumerate() {
        if index % 2 == 0 {
            for _ in 0..2 {
                let task = outcomes.next().unwrap().expect("a retried start succeeds");
                assert_eq!(task.id, task_id(claim));
                assert_eq!(status_of(&task), TaskStatus::Running);
            }
        } else {
            let refused = outcomes
                .next()
                .unwrap()
                .expect_err("a stale token is refused");
            assert_error(&refused, Code::FailedPrecondition, "CLAIM_SUPERSEDED");
            let stored = server.get_task(task_id(claim)).await;
            assert_eq!(status_of(&stored), TaskStatus::Dispatched);
        }
    }
}
