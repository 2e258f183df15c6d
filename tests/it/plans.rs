//! Query plans that matter for speed, checked by which index a statement used (counted in the
//! transaction itself, so nothing waits on the statistics collector).

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::harness::TestServer;

/// Index scans of `index` so far in the current transaction.
async fn scans(connection: &mut PgConnection, index: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_stat_get_xact_numscans($1::regclass)")
        .bind(index)
        .fetch_one(connection)
        .await
        .unwrap()
}

/// One task claimed in `transaction`, by walking `tasks_claimable`.
async fn claim_one_along_the_claim_index(transaction: &mut PgConnection, runtime_id: &str) {
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM leasehold_claim($1::uuid, 1, interval '60 seconds', 5, interval '10 seconds')",
    )
    .bind(runtime_id)
    .fetch_one(&mut *transaction)
    .await
    .unwrap();
    assert_eq!(claimed, 1);
    assert!(
        scans(transaction, "tasks_claimable").await >= 1,
        "the claim index was not walked"
    );
}

#[sqlx::test]
async fn a_claim_walks_the_claim_index_even_with_statistics(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect.clone()).await;
    let runtime_id = server.register("planner", &["deep"]).await;
    let mut connection = PgConnection::connect_with(&connect).await.unwrap();
    // A table with history: a deep queue and many finished tasks elsewhere, as after a busy
    // day. With statistics on such a table the planner used to pick the (queue, status) index
    // and sort every QUEUED row of the queue on each claim.
    sqlx::query(
        "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                            available_at, finished_at)
         SELECT gen_random_uuid(),
                CASE WHEN g % 3 = 0 THEN 'deep' ELSE 'history' END,
                '\\x00'::bytea,
                CASE WHEN g % 3 = 0 THEN 'QUEUED' ELSE 'COMPLETED' END,
                1, 3, now() - make_interval(secs => g / 1000.0), now() - interval '1 second',
                CASE WHEN g % 3 = 0 THEN NULL ELSE now() END
         FROM generate_series(1, 60000) g",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks")
        .execute(&mut connection)
        .await
        .unwrap();

    let mut transaction = connection.begin().await.unwrap();
    claim_one_along_the_claim_index(&mut transaction, &runtime_id).await;
    assert_eq!(
        scans(&mut transaction, "tasks_finished_by_queue").await,
        0,
        "the claim fetched and sorted the whole queue"
    );
    transaction.rollback().await.unwrap();
}

/// Statistics taken while the queue was empty (what autovacuum does on a quiet night), then a
/// sudden backlog: the claim still walks the claim index instead of reading the backlog.
#[sqlx::test]
async fn a_claim_after_statistics_of_an_empty_table_still_walks_the_claim_index(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect.clone()).await;
    let runtime_id = server.register("after-a-quiet-night", &["burst"]).await;
    let mut connection = PgConnection::connect_with(&connect).await.unwrap();
    sqlx::query("ANALYZE tasks")
        .execute(&mut connection)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                            available_at)
         SELECT gen_random_uuid(), 'burst', '\\x00'::bytea, 'QUEUED', 1, 3,
                now() - make_interval(secs => g / 1000.0), now() - interval '1 second'
         FROM generate_series(1, 20000) g",
    )
    .execute(&mut connection)
    .await
    .unwrap();

    let mut transaction = connection.begin().await.unwrap();
    claim_one_along_the_claim_index(&mut transaction, &runtime_id).await;
    let read: i64 =
        sqlx::query_scalar("SELECT pg_stat_get_xact_tuples_returned('tasks_claimable'::regclass)")
            .fetch_one(&mut *transaction)
            .await
            .unwrap();
    assert!(read < 1000, "the claim read {read} entries of the backlog");
    transaction.rollback().await.unwrap();
}
