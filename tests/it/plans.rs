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

/// A busy day, statistics taken while no task was held (an idle night: the partial indexes of
/// held tasks have pages but no entries), then another busy day with 20,000 tasks held by
/// another runtime. A claim looks up only its own runtime's held tasks (the preflight's expired
/// leases, the capacity count) along `tasks_held_by_runtime`; it used to read every held task
/// along another partial index that the statistics showed empty, hence free to read whole.
#[sqlx::test]
async fn a_claim_after_statistics_of_an_idle_table_reads_only_its_own_held_tasks(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect.clone()).await;
    let runtime_id = server.register("after-an-idle-night", &["work"]).await;
    let busy_id = server.register("busy-elsewhere", &["work"]).await;
    let mut connection = PgConnection::connect_with(&connect).await.unwrap();
    sqlx::query("UPDATE runtimes SET max_concurrency = 100 WHERE id = $1::uuid")
        .bind(&runtime_id)
        .execute(&mut connection)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                            available_at, claimed_by, claim_token, dispatched_at, started_at,
                            lease_expires_at)
         SELECT gen_random_uuid(), 'work', '\\x00'::bytea,
                CASE WHEN g % 2 = 0 THEN 'DISPATCHED' ELSE 'RUNNING' END, 1, 3,
                now(), now(), $1::uuid, gen_random_uuid(), now(),
                CASE WHEN g % 2 = 0 THEN NULL ELSE now() END, now() + interval '1 hour'
         FROM generate_series(1, 20000) g
         UNION ALL
         SELECT gen_random_uuid(), 'work', '\\x00'::bytea, 'QUEUED', 1, 3, now(), now(),
                NULL, NULL, NULL, NULL, NULL",
    )
    .bind(&busy_id)
    .execute(&mut connection)
    .await
    .unwrap();
    for statement in [
        "UPDATE tasks SET status = 'COMPLETED' WHERE claimed_by IS NOT NULL",
        "VACUUM ANALYZE tasks",
        "UPDATE tasks SET status = CASE WHEN started_at IS NULL THEN 'DISPATCHED' ELSE 'RUNNING' END
         WHERE claimed_by IS NOT NULL",
    ] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
    }

    let mut transaction = connection.begin().await.unwrap();
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM leasehold_claim_many(ARRAY[$1::uuid], '{1}', '{f}',
                                                   '{10 seconds}', interval '60 seconds', 5)",
    )
    .bind(&runtime_id)
    .fetch_one(&mut *transaction)
    .await
    .unwrap();
    assert_eq!(claimed, 1);
    let read: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_stat_get_xact_tuples_returned(i.indexrelid)
         FROM pg_index i WHERE i.indrelid = 'tasks'::regclass",
    )
    .fetch_all(&mut *transaction)
    .await
    .unwrap();
    let total: i64 = read.iter().map(|(_, entries)| entries).sum();
    assert!(
        total < 1000,
        "the claim read {total} index entries of held tasks: {read:?}"
    );
    transaction.rollback().await.unwrap();
}
