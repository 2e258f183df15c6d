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

/// A busy day, then statistics taken while no task was held (an idle night: the partial indexes
/// of held tasks have pages but no entries), then another busy day: 20,000 tasks held by
/// `busy_id`, half DISPATCHED and half RUNNING, and 1,000 QUEUED.
async fn held_tasks_after_an_idle_night(connection: &mut PgConnection, busy_id: &str) {
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
                NULL, NULL, NULL, NULL, NULL
         FROM generate_series(1, 1000) g",
    )
    .bind(busy_id)
    .execute(&mut *connection)
    .await
    .unwrap();
    for statement in [
        "UPDATE tasks SET status = 'COMPLETED' WHERE claimed_by IS NOT NULL",
        "VACUUM ANALYZE tasks",
        "UPDATE tasks SET status = CASE WHEN started_at IS NULL THEN 'DISPATCHED' ELSE 'RUNNING' END
         WHERE claimed_by IS NOT NULL",
    ] {
        sqlx::query(statement)
            .execute(&mut *connection)
            .await
            .unwrap();
    }
}

/// Index entries of `tasks` read so far in the current transaction, per index.
async fn index_entries_read(transaction: &mut PgConnection) -> (i64, Vec<(String, i64)>) {
    let read: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_stat_get_xact_tuples_returned(i.indexrelid)
         FROM pg_index i WHERE i.indrelid = 'tasks'::regclass",
    )
    .fetch_all(&mut *transaction)
    .await
    .unwrap();
    (read.iter().map(|(_, entries)| entries).sum(), read)
}

/// After an idle night's statistics, a claim looks up only its own runtime's held tasks (the
/// preflight's expired leases, the capacity count) along `tasks_held_by_runtime`; it used to
/// read every held task along another partial index that the statistics showed empty, hence
/// free to read whole.
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
    held_tasks_after_an_idle_night(&mut connection, &busy_id).await;

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
    let (total, read) = index_entries_read(&mut transaction).await;
    assert!(
        total < 1000,
        "the claim read {total} index entries of held tasks: {read:?}"
    );
    transaction.rollback().await.unwrap();
}

/// After an idle night's statistics, the shared start and complete statements find each task
/// by its id. With the status they require written out, the planner judged the held-tasks
/// index empty and read all 10,000 DISPATCHED (or RUNNING) entries for every statement, and
/// kept doing so once it settled on a generic plan. Each statement runs seven times, so that
/// the plan cache's generic plan runs too (it takes over after five custom plans).
#[sqlx::test]
async fn starts_and_completes_after_statistics_of_an_idle_table_find_tasks_by_id(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use leasehold::store::postgres::statements::{COMPLETE_MANY, START_MANY};

    let server = TestServer::start(pool, connect.clone()).await;
    let busy_id = server.register("busy-all-day", &["work"]).await;
    let mut connection = PgConnection::connect_with(&connect).await.unwrap();
    held_tasks_after_an_idle_night(&mut connection, &busy_id).await;
    let held = |status: &'static str| {
        sqlx::query_as::<_, (uuid::Uuid, uuid::Uuid)>(
            "SELECT id, claim_token FROM tasks WHERE status = $1 ORDER BY id LIMIT 7",
        )
        .bind(status)
    };
    let dispatched = held("DISPATCHED").fetch_all(&mut connection).await.unwrap();
    let running = held("RUNNING").fetch_all(&mut connection).await.unwrap();

    // A new connection: a backend's counts of index entries read include its statements of
    // earlier transactions until it reports them (at most once a second).
    let mut measured = PgConnection::connect_with(&connect).await.unwrap();
    let mut transaction = measured.begin().await.unwrap();
    for ((start_id, start_token), (complete_id, complete_token)) in
        dispatched.into_iter().zip(running)
    {
        let started = sqlx::query(START_MANY)
            .bind(vec![start_id])
            .bind(vec![start_token])
            .bind(vec![Some(uuid::Uuid::parse_str(&busy_id).unwrap())])
            .execute(&mut *transaction)
            .await
            .unwrap();
        assert_eq!(started.rows_affected(), 1);
        let completed = sqlx::query(COMPLETE_MANY)
            .bind(vec![complete_id])
            .bind(vec![complete_token])
            .bind(vec![b"done".to_vec()])
            .bind(vec![None::<uuid::Uuid>])
            .execute(&mut *transaction)
            .await
            .unwrap();
        assert_eq!(completed.rows_affected(), 1);
    }
    let (total, read) = index_entries_read(&mut transaction).await;
    assert!(
        total < 1000,
        "7 starts and 7 completes read {total} index entries: {read:?}"
    );
    transaction.rollback().await.unwrap();
}
