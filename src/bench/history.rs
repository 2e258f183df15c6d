//! The `history` scenario (spec §11): what a long history costs. The unary and streamed
//! lifecycles run on an empty tasks table, then again after `--history-rows` finished tasks
//! were written into the same queues; then a server with a short `--retain-finished` works
//! through rounds of load while the table's row count is sampled, to show retention keeps it
//! bounded.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use super::servers::{ScratchDatabase, ServerProcess};
use super::{BenchArgs, scenarios};
use crate::client::Client;

/// Rounds of load under the short retention, and how long it keeps finished tasks.
const RETENTION_ROUNDS: usize = 4;
const SHORT_RETENTION: &str = "3s";

pub(super) async fn measure(
    args: &BenchArgs,
    database: &ScratchDatabase,
    client: &Client,
) -> anyhow::Result<Value> {
    let empty = lifecycles(args, database, client, "history-empty").await?;
    let started = std::time::Instant::now();
    for queue in ["history-full", "history-full-stream", "history-elsewhere"] {
        write_history(&database.url, queue, args.history_rows / 3).await?;
    }
    let written_in = started.elapsed();
    let full = lifecycles(args, database, client, "history-full").await?;
    let ratio = |key: &str| {
        full[key]
            .as_f64()
            .zip(empty[key].as_f64())
            .map(|(full, empty)| full / empty)
    };
    Ok(json!({
        "history_rows": args.history_rows,
        "history_written_s": written_in.as_secs_f64(),
        "empty": empty,
        "with_history": full,
        "unary_ratio": ratio("unary_tasks_per_second"),
        "stream_ratio": ratio("stream_tasks_per_second"),
        "retention": retention_keeps_the_table_bounded(args).await?,
    }))
}

async fn lifecycles(
    args: &BenchArgs,
    database: &ScratchDatabase,
    client: &Client,
    queue: &str,
) -> anyhow::Result<Value> {
    let (unary, streamed) = super::lifecycle_pair(args, database, client, queue).await?;
    Ok(json!({
        "unary_tasks_per_second": unary.tasks_per_second,
        "unary_claim_p99_ms": unary.claim_latency.millis(0.99),
        "stream_tasks_per_second": streamed,
    }))
}

/// `rows` COMPLETED tasks of `queue`, finished a day ago, written in one statement.
async fn write_history(database_url: &str, queue: &str, rows: usize) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(database_url).await?;
    sqlx::query(
        "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                            available_at, dispatched_at, started_at, finished_at, result)
         SELECT gen_random_uuid(), $1, '\\x00'::bytea, 'COMPLETED', 1, 3,
                now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',
                now() - interval '1 day', now() - interval '1 day', '\\x00'::bytea
         FROM generate_series(1, $2)",
    )
    .bind(queue)
    .bind(i64::try_from(rows)?)
    .execute(&mut connection)
    .await?;
    Ok(())
}

async fn task_rows(database_url: &str) -> anyhow::Result<i64> {
    let mut connection = PgConnection::connect(database_url).await?;
    Ok(sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&mut connection)
        .await?)
}

/// A server sweeping every second with a short retention, on a database of its own (where it
/// leads the sweep) holding the same history, under rounds of streamed load: the tasks table's
/// row count before the first round and after each.
async fn retention_keeps_the_table_bounded(args: &BenchArgs) -> anyhow::Result<Value> {
    let database = ScratchDatabase::create(&args.database_url, "retention").await?;
    let outcome = retention_rounds(args, &database).await;
    database.drop_database().await?;
    outcome
}

async fn retention_rounds(args: &BenchArgs, database: &ScratchDatabase) -> anyhow::Result<Value> {
    let extra = [
        "--retain-finished",
        SHORT_RETENTION,
        "--sweep-interval",
        "1s",
    ];
    let server =
        ServerProcess::start(Some(&database.url), args.redis_url.as_deref(), &extra).await?;
    let client = server.client()?;
    write_history(&database.url, "history-elsewhere", args.history_rows).await?;
    let mut rows = vec![task_rows(&database.url).await?];
    let rounds = if args.smoke { 1 } else { RETENTION_ROUNDS };
    for round in 0..rounds {
        let queue = format!("history-retention-{round}");
        scenarios::enqueue_in_batches(&client, &queue, args.tasks, args.producers).await?;
        scenarios::lifecycle_stream(
            &client,
            &queue,
            args.workers,
            args.stream_credits,
            args.tasks,
            false,
        )
        .await?;
        // Longer than the retention plus a sweep, so this round's tasks may go too.
        tokio::time::sleep(Duration::from_secs(5)).await;
        rows.push(task_rows(&database.url).await?);
    }
    Ok(json!({
        "retain_finished": SHORT_RETENTION,
        "tasks_per_round": args.tasks,
        "table_rows_after_each_round": rows,
    }))
}
