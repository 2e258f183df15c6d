//! The `console` scenario (docs/console.md): how long the queue page takes with a large tasks
//! table. `--console-rows` tasks are written across 20 queues (a tenth QUEUED, the rest
//! COMPLETED), a server with `--http-listen` sweeps once so the snapshot exists, then the page is
//! fetched over HTTP again and again.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::BenchArgs;
use super::scenarios::Latencies;
use super::servers::{ScratchDatabase, ServerProcess};

const QUEUES: usize = 20;
const FETCHES: usize = 50;

pub(super) async fn measure(args: &BenchArgs) -> anyhow::Result<Value> {
    let database = ScratchDatabase::create(&args.database_url, "console").await?;
    let options: sqlx::postgres::PgConnectOptions = database.url.parse()?;
    crate::store::postgres::schema::apply(&options, Default::default()).await?;
    let written = Instant::now();
    write_tasks(&database.url, args.console_rows).await?;
    let written_in = written.elapsed();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = format!("127.0.0.1:{port}");
    let server = ServerProcess::start(
        Some(&database.url),
        None,
        &["--http-listen", &address, "--sweep-interval", "1s"],
    )
    .await?;
    wait_for_counts(&address).await?;
    let mut samples = Vec::with_capacity(FETCHES);
    let mut bytes = 0;
    for _ in 0..FETCHES {
        let started = Instant::now();
        bytes = get(&address, "/queues").await?.len();
        samples.push(started.elapsed());
    }
    let latencies = Latencies::new(samples);
    drop(server);
    database.drop_database().await?;
    Ok(json!({
        "tasks_in_table": args.console_rows,
        "tasks_written_s": written_in.as_secs_f64(),
        "queue_page_p50_ms": latencies.millis(0.5),
        "queue_page_p99_ms": latencies.millis(0.99),
        "queue_page_bytes": bytes,
    }))
}

/// `rows` tasks over [`QUEUES`] queues, one statement per queue.
async fn write_tasks(database_url: &str, rows: usize) -> anyhow::Result<()> {
    let mut connection = PgConnection::connect(database_url).await?;
    let per_queue = i64::try_from(rows / QUEUES)?;
    for queue in 0..QUEUES {
        sqlx::query(
            "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                                available_at, dispatched_at, started_at, finished_at, result)
             SELECT gen_random_uuid(), $1, '\\x00'::bytea,
                    CASE WHEN n % 10 = 0 THEN 'QUEUED' ELSE 'COMPLETED' END, 1, 3,
                    now() - interval '1 day', now() - interval '1 day',
                    CASE WHEN n % 10 = 0 THEN NULL ELSE now() - interval '1 day' END,
                    CASE WHEN n % 10 = 0 THEN NULL ELSE now() - interval '1 day' END,
                    CASE WHEN n % 10 = 0 THEN NULL ELSE now() - interval '1 day' END,
                    CASE WHEN n % 10 = 0 THEN NULL ELSE '\\x00'::bytea END
             FROM generate_series(1, $2) AS n",
        )
        .bind(format!("console-{queue:02}"))
        .bind(per_queue)
        .execute(&mut connection)
        .await?;
    }
    sqlx::query("ANALYZE tasks")
        .execute(&mut connection)
        .await?;
    Ok(())
}

/// Until the sweep wrote the snapshot (the page shows "Counted … ago").
async fn wait_for_counts(address: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if get(address, "/queues").await?.contains("Counted ") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("the sweep never wrote the queue snapshot")
}

/// The body of `GET path`, over one HTTP/1.1 connection.
async fn get(address: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    anyhow::ensure!(
        text.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        text.lines().next().unwrap_or("")
    );
    Ok(text)
}
