//! One claim statement for several claims (`functions/leasehold_claim_many.sql`): the queues are
//! walked once and the tasks dealt best first, each to the first claim that may take it. Each
//! claim must get what it would get claiming alone right after the claims before it: pins,
//! concurrency keys, queue caps and runtime capacity hold across the claims of one call.
//!
//! The function is called directly with hand-made rows, so each test decides exactly which
//! claims share the statement.

use sqlx::PgPool;
use uuid::Uuid;

const A: Uuid = Uuid::from_u128(0xa);
const B: Uuid = Uuid::from_u128(0xb);

async fn runtime(pool: &PgPool, id: Uuid, queues: &[&str], max_concurrency: i64) {
    sqlx::query(
        "INSERT INTO runtimes (id, name, queues, max_concurrency, status, last_seen_at,
                               registered_at)
         VALUES ($1, $1::text, $2, $3, 'ONLINE', now(), now())",
    )
    .bind(id)
    .bind(queues)
    .bind(max_concurrency)
    .execute(pool)
    .await
    .unwrap();
}

/// A QUEUED task whose payload is `label`; created in the order of the calls.
async fn task(pool: &PgPool, label: &str, queue: &str, priority: i32) {
    task_with(pool, label, queue, priority, None, None).await;
}

async fn task_with(
    pool: &PgPool,
    label: &str,
    queue: &str,
    priority: i32,
    pinned_to: Option<Uuid>,
    key: Option<&str>,
) {
    sqlx::query(
        "INSERT INTO tasks (id, queue, runtime_id, concurrency_key, priority, payload, status,
                            max_attempts, created_at, available_at)
         VALUES (gen_random_uuid(), $1, $2, $3, $4, convert_to($5, 'UTF8'), 'QUEUED', 3,
                 clock_timestamp(), now())",
    )
    .bind(queue)
    .bind(pinned_to)
    .bind(key)
    .bind(priority)
    .bind(label)
    .execute(pool)
    .await
    .unwrap();
}

/// What each claim got: (claim number, task label, status), in the order returned.
async fn claim(pool: &PgPool, claims: &[(Uuid, i32)]) -> Vec<(i32, String, String)> {
    let runtimes: Vec<Uuid> = claims.iter().map(|(runtime, _)| *runtime).collect();
    let max_tasks: Vec<i32> = claims.iter().map(|(_, max)| *max).collect();
    sqlx::query_as(
        "SELECT request_number, convert_from((task_row).payload, 'UTF8'), (task_row).status
         FROM leasehold_claim_many($1, $2, array_fill(false, ARRAY[cardinality($1)]),
                                   array_fill(NULL::interval, ARRAY[cardinality($1)]),
                                   interval '1 minute', 5)",
    )
    .bind(runtimes)
    .bind(max_tasks)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn dealt(claimed: &[(i32, String, String)]) -> Vec<(i32, &str)> {
    claimed
        .iter()
        .map(|(claim, label, _)| (*claim, label.as_str()))
        .collect()
}

#[sqlx::test]
async fn each_claim_gets_the_best_tasks_left_by_the_claims_before_it(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    runtime(&pool, B, &["a", "b"], 0).await;
    task(&pool, "a1", "a", 5).await;
    task(&pool, "a2", "a", 4).await;
    task(&pool, "a3", "a", 3).await;
    task(&pool, "a4", "a", 3).await;
    task(&pool, "b1", "b", 9).await;

    let claimed = claim(&pool, &[(A, 2), (B, 2)]).await;
    assert_eq!(
        dealt(&claimed),
        [(1, "a1"), (1, "a2"), (2, "b1"), (2, "a3")]
    );
    assert!(claimed.iter().all(|(_, _, status)| status == "DISPATCHED"));
    let owners: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT convert_from(payload, 'UTF8'), claimed_by FROM tasks
         WHERE status = 'DISPATCHED' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        owners,
        [("a1", A), ("a2", A), ("a3", B), ("b1", B)].map(|(label, id)| (label.into(), id))
    );
}

#[sqlx::test]
async fn the_order_of_the_claims_decides_who_gets_the_best(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    runtime(&pool, B, &["a", "b"], 0).await;
    task(&pool, "a1", "a", 5).await;
    task(&pool, "a2", "a", 4).await;
    task(&pool, "a3", "a", 3).await;
    task(&pool, "b1", "b", 9).await;

    let claimed = claim(&pool, &[(B, 2), (A, 2)]).await;
    assert_eq!(
        dealt(&claimed),
        [(1, "b1"), (1, "a1"), (2, "a2"), (2, "a3")]
    );
}

#[sqlx::test]
async fn a_pinned_task_goes_only_to_its_runtime_even_when_it_is_the_best(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    runtime(&pool, B, &["a"], 0).await;
    task_with(&pool, "for-b", "a", 9, Some(B), None).await;
    task(&pool, "a1", "a", 5).await;
    task(&pool, "a2", "a", 4).await;

    let claimed = claim(&pool, &[(A, 1), (B, 1)]).await;
    assert_eq!(dealt(&claimed), [(1, "a1"), (2, "for-b")]);
}

#[sqlx::test]
async fn one_task_per_concurrency_key_across_the_claims_of_a_call(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    runtime(&pool, B, &["a"], 0).await;
    task_with(&pool, "x1", "a", 9, None, Some("x")).await;
    task_with(&pool, "x2", "a", 8, None, Some("x")).await;
    task(&pool, "plain", "a", 1).await;

    let claimed = claim(&pool, &[(A, 1), (B, 2)]).await;
    assert_eq!(dealt(&claimed), [(1, "x1"), (2, "plain")]);
    let slots: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.key, convert_from(t.payload, 'UTF8')
         FROM concurrency_slots s JOIN tasks t ON t.id = s.task_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(slots, [("x".to_owned(), "x1".to_owned())]);
}

#[sqlx::test]
async fn a_capped_queue_gives_no_more_than_its_room_to_all_the_claims_together(pool: PgPool) {
    runtime(&pool, A, &["capped", "free"], 0).await;
    runtime(&pool, B, &["capped", "free"], 0).await;
    sqlx::query("INSERT INTO queues (name, max_concurrent) VALUES ('capped', 2)")
        .execute(&pool)
        .await
        .unwrap();
    for label in ["c1", "c2", "c3"] {
        task(&pool, label, "capped", 9).await;
    }
    task(&pool, "f1", "free", 1).await;

    let claimed = claim(&pool, &[(A, 1), (B, 3)]).await;
    assert_eq!(dealt(&claimed), [(1, "c1"), (2, "c2"), (2, "f1")]);
}

#[sqlx::test]
async fn two_claims_of_one_runtime_share_its_free_slots(pool: PgPool) {
    runtime(&pool, A, &["a"], 3).await;
    for label in ["a1", "a2", "a3", "a4", "a5"] {
        task(&pool, label, "a", 1).await;
    }
    let first = claim(&pool, &[(A, 1)]).await;
    assert_eq!(dealt(&first), [(1, "a1")]);

    let claimed = claim(&pool, &[(A, 2), (A, 2)]).await;
    assert_eq!(dealt(&claimed), [(1, "a2"), (1, "a3")]);
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE claimed_by = $1 AND status = 'DISPATCHED'",
    )
    .bind(A)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(held, 3, "max_concurrency 3");
}

#[sqlx::test]
async fn expired_leases_come_back_in_their_runtimes_first_claim(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    runtime(&pool, B, &["a"], 0).await;
    task(&pool, "lapsed", "a", 1).await;
    claim(&pool, &[(B, 1)]).await;
    sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();

    let claimed = claim(&pool, &[(A, 0), (B, 0), (B, 0)]).await;
    let requeued: Vec<(i32, &str, &str)> = claimed
        .iter()
        .map(|(claim, label, status)| (*claim, label.as_str(), status.as_str()))
        .collect();
    assert_eq!(requeued, [(2, "lapsed", "QUEUED")]);
}

#[sqlx::test]
async fn an_unknown_runtime_fails_the_whole_call(pool: PgPool) {
    runtime(&pool, A, &["a"], 0).await;
    task(&pool, "a1", "a", 1).await;

    let error = sqlx::query(
        "SELECT * FROM leasehold_claim_many($1, '{1,1}', '{f,f}', '{NULL,NULL}',
                                            interval '1 minute', 5)",
    )
    .bind(vec![A, B])
    .execute(&pool)
    .await
    .unwrap_err();
    let code = error.as_database_error().and_then(|error| error.code());
    assert_eq!(code.as_deref(), Some("LH001"));
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE status = 'QUEUED'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 1, "nothing was claimed");
}

/// As alone: a claim looks at its best `max_tasks` candidates, and those a cap or a key turns
/// away still count, so it may get fewer than it asked while other queues have work.
#[sqlx::test]
async fn a_claim_looks_only_at_its_best_candidates_even_when_a_cap_turns_some_away(pool: PgPool) {
    runtime(&pool, A, &["capped", "free"], 0).await;
    sqlx::query("INSERT INTO queues (name, max_concurrent) VALUES ('capped', 1)")
        .execute(&pool)
        .await
        .unwrap();
    task(&pool, "c1", "capped", 0).await;
    task(&pool, "c2", "capped", 0).await;
    task(&pool, "f1", "free", -1).await;

    let claimed = claim(&pool, &[(A, 2)]).await;
    assert_eq!(dealt(&claimed), [(1, "c1")]);
    let next = claim(&pool, &[(A, 2)]).await;
    assert_eq!(dealt(&next), [(1, "f1")], "the full queue is not walked");
}
