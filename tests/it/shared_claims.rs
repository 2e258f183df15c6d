//! Claims of one replica share statements while its claim statements are busy
//! (store/postgres/shared_claims.rs): each claim in a shared statement gets exactly what its
//! own statement would have given it, and a shared statement that fails lets each claim run
//! alone.
//!
//! The replica runs at most two claim statements at a time. The tests hold both: two runtimes
//! of a capped queue claim while the test holds the queue's row (a capped queue's claims lock
//! it), so every claim made meanwhile waits for the next statement.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::harness::{TestServer, task_id};
use leasehold::domain::{Error, RuntimeId};
use leasehold::store::ClaimRequest;

const WAITING: usize = 24;

/// The capped queue `gate` with one task for each of its two runtimes, and the transaction
/// that holds its row.
async fn gate(server: &TestServer, connect: &PgConnectOptions) -> (Vec<String>, PgConnection) {
    server.update_queue("gate", Some(10), None).await;
    let mut runtimes = Vec::new();
    for name in ["gated-1", "gated-2"] {
        runtimes.push(server.register(name, &["gate"]).await);
        server.enqueue_to("gate").await;
    }
    let mut holder = PgConnection::connect_with(connect).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM queues WHERE name = 'gate' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    (runtimes, holder)
}

/// Waits until both of the replica's claim statements wait for the gate's row.
async fn until_both_statements_wait(server: &TestServer) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE '%leasehold_claim%'",
        )
        .fetch_one(server.pool())
        .await
        .unwrap();
        if waiting == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the gated claims never waited for the queue's row");
}

/// Opens the gate once the claims made meanwhile had time to reach the replica's claim loop
/// (they cannot reach PostgreSQL before it opens).
async fn open_gate(mut holder: PgConnection) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
}

/// How many statements claimed the queue's tasks, told by the distinct `now()` they recorded
/// (rows one statement writes share its transaction's `now()`).
async fn claim_statements(server: &TestServer, queue: &str) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT dispatched_at) FROM tasks WHERE queue = $1")
        .bind(queue)
        .fetch_one(server.pool())
        .await
        .unwrap()
}

#[sqlx::test]
async fn claims_made_while_the_statements_are_busy_share_one_and_each_gets_its_own_task(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect.clone()).await;
    let mut runtimes = Vec::new();
    for index in 0..WAITING {
        runtimes.push(
            server
                .register(&format!("waiting-{index}"), &["open"])
                .await,
        );
        server.enqueue_to("open").await;
    }
    let (gated, holder) = gate(&server, &connect).await;

    let gated_claims = join_all(gated.iter().map(|runtime| server.claim(runtime, Some(1))));
    let waiting_claims = async {
        until_both_statements_wait(&server).await;
        let claims = join_all(
            runtimes
                .iter()
                .map(|runtime| server.claim(runtime, Some(1))),
        );
        let (claimed, ()) = tokio::join!(claims, open_gate(holder));
        claimed
    };
    let (gated_claimed, claimed) = tokio::join!(gated_claims, waiting_claims);

    assert!(gated_claimed.iter().all(|claimed| claimed.len() == 1));
    let mut tasks = HashSet::new();
    for (runtime, claimed) in runtimes.iter().zip(&claimed) {
        assert_eq!(claimed.len(), 1, "each waiting claim gets one task");
        let task = server.get_task(task_id(&claimed[0])).await;
        assert_eq!(
            &task.claimed_by, runtime,
            "a task answered to its own claimer"
        );
        assert!(tasks.insert(task.id), "a task claimed twice");
    }
    let statements = claim_statements(&server, "open").await;
    assert!(
        statements <= 2,
        "{WAITING} claims that waited together took {statements} statements"
    );
}

#[sqlx::test]
async fn a_shared_claim_that_fails_lets_each_claim_run_alone(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect.clone()).await;
    let mut runtimes = Vec::new();
    for index in 0..4 {
        let runtime = server.register(&format!("alone-{index}"), &["open"]).await;
        runtimes.push(RuntimeId::parse(&runtime).unwrap());
        server.enqueue_to("open").await;
    }
    // A runtime that does not exist fails the statement it shares (LH001).
    let unknown = RuntimeId::from_uuid(uuid::Uuid::new_v4());
    let (gated, holder) = gate(&server, &connect).await;

    let store = server.store();
    let claim = |runtime_id| {
        let store = store.clone();
        async move {
            let request = ClaimRequest {
                runtime_id,
                max_tasks: 1,
                budget: Some(Duration::from_secs(30)),
                auto_start: false,
            };
            store.claim(request).await
        }
    };
    let gated_claims = join_all(gated.iter().map(|runtime| server.claim(runtime, Some(1))));
    let waiting_claims = async {
        until_both_statements_wait(&server).await;
        let claims = runtimes.iter().copied().chain([unknown]).map(claim);
        let (outcomes, ()) = tokio::join!(join_all(claims), open_gate(holder));
        outcomes
    };
    let (_, mut outcomes) = tokio::join!(gated_claims, waiting_claims);

    let unknown_outcome = outcomes.pop().unwrap();
    assert!(
        matches!(unknown_outcome, Err(Error::RuntimeNotFound(runtime)) if runtime == unknown),
        "{unknown_outcome:?}"
    );
    for (runtime, outcome) in runtimes.iter().zip(outcomes) {
        let claimed = outcome.expect("the others claim alone").claimed;
        assert_eq!(claimed.len(), 1);
        let task = server.get_task(&claimed[0].task.id.to_string()).await;
        assert_eq!(task.claimed_by, runtime.to_string());
    }
    assert_eq!(
        claim_statements(&server, "open").await,
        4,
        "after the shared statement failed, each claim ran its own"
    );
}
