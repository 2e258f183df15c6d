//! The `plans` scenario (issue #20, item 4): does the claim keep its plan whatever the
//! statistics say? On a database of its own, with autovacuum off for `tasks` (so nothing
//! refreshes them behind the scenario's back), `ANALYZE` runs while the table is empty — what
//! autovacuum does on an idle night — then `--tasks` tasks arrive, a burst, and one runtime
//! claims them one at a time. The same again after a real `ANALYZE`. The claim's latency in
//! the two states, and their ratio (target: at most 2).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use super::scenarios::{self, Latencies};
use super::servers::{ScratchDatabase, ServerProcess};
use crate::client::Client;
use crate::proto as pb;

/// Claims timed in each state (fewer when fewer tasks are queued).
const SAMPLES: usize = 500;

pub(super) async fn measure(
    database_url: &str,
    redis_url: Option<&str>,
    tasks: usize,
    producers: usize,
) -> anyhow::Result<Value> {
    let database = ScratchDatabase::create(database_url, "plans").await?;
    let outcome = stale_then_fresh(&database.url, redis_url, tasks, producers).await;
    database.drop_database().await?;
    outcome
}

async fn stale_then_fresh(
    url: &str,
    redis_url: Option<&str>,
    tasks: usize,
    producers: usize,
) -> anyhow::Result<Value> {
    let server = ServerProcess::start(Some(url), redis_url, &[]).await?;
    let client = server.client()?;
    sql(url, "ALTER TABLE tasks SET (autovacuum_enabled = false)").await?;

    sql(url, "ANALYZE tasks").await?;
    scenarios::enqueue_in_batches(&client, "plans-stale", tasks, producers).await?;
    let samples = SAMPLES.min(tasks);
    let stale = claim_latencies(&client, "plans-stale", samples).await?;

    sql(url, "ANALYZE tasks").await?;
    scenarios::enqueue_in_batches(&client, "plans-fresh", tasks, producers).await?;
    sql(url, "ANALYZE tasks").await?;
    let fresh = claim_latencies(&client, "plans-fresh", samples).await?;

    let (stale_ms, fresh_ms) = (stale.millis(0.5), fresh.millis(0.5));
    Ok(json!({
        "queued_tasks": tasks,
        "samples": samples,
        "after_empty_table_statistics": { "p50_ms": stale_ms, "p99_ms": stale.millis(0.99) },
        "after_real_statistics": { "p50_ms": fresh_ms, "p99_ms": fresh.millis(0.99) },
        "p50_ratio": stale_ms / fresh_ms.max(f64::EPSILON),
    }))
}

/// One runtime claims one task at a time, `samples` times (nothing else runs meanwhile).
async fn claim_latencies(
    client: &Client,
    queue: &str,
    samples: usize,
) -> anyhow::Result<Latencies> {
    // It keeps every task it claims: no limit on how many it holds.
    let name = format!("{queue}-claimer");
    let runtime = scenarios::register_holding(client, name, queue, 0).await?;
    let mut worker = runtime.client.worker();
    let mut latencies: Vec<Duration> = Vec::with_capacity(samples);
    for _ in 0..samples {
        let request = pb::ClaimTaskRequest {
            runtime_id: runtime.id.clone(),
            max_tasks: Some(1),
            wait: None,
        };
        let started = Instant::now();
        let claimed = worker.claim_task(request).await?.into_inner().tasks;
        latencies.push(started.elapsed());
        anyhow::ensure!(
            claimed.len() == 1,
            "claim {} of {samples} on {queue} got {} tasks",
            latencies.len(),
            claimed.len()
        );
    }
    Ok(Latencies::new(latencies))
}

async fn sql(url: &str, statement: &'static str) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(url).await?;
    sqlx::raw_sql(statement).execute(&mut connection).await?;
    Ok(())
}
