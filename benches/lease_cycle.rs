//! Throughput and latency of the lease cycle over real gRPC and PostgreSQL.
//!
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench lease_cycle`
//!
//! Creates a scratch database, serves leasehold on 127.0.0.1:0, enqueues `BENCH_TASKS` tasks
//! from `BENCH_PRODUCERS` concurrent producers, then drains them with `BENCH_WORKERS` runtimes
//! each claiming `BENCH_BATCH` at a time and running start + complete per task. Prints figures;
//! asserts only that every task completed exactly once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use leasehold::app::App;
use leasehold::config::Config;
use leasehold::grpc::pb;
use leasehold::grpc::pb::task_service_client::TaskServiceClient;
use leasehold::grpc::pb::worker_service_client::WorkerServiceClient;
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tonic::transport::Channel;

struct Sizes {
    tasks: usize,
    producers: usize,
    workers: usize,
    batch: u32,
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let admin_url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let sizes = Sizes {
        tasks: env_or("BENCH_TASKS", 4000),
        producers: env_or("BENCH_PRODUCERS", 8),
        workers: env_or("BENCH_WORKERS", 8),
        batch: u32::try_from(env_or("BENCH_BATCH", 8))?,
    };
    let database = format!("leasehold_bench_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await?;
    // The name is made of a fixed prefix and our pid: nothing external reaches this SQL.
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut admin)
        .await?;
    let outcome = run(&database_url(&admin_url, &database), &sizes).await;
    sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE {database} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    outcome
}

fn database_url(admin_url: &str, database: &str) -> String {
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    format!("{base}/{database}")
}

async fn run(url: &str, sizes: &Sizes) -> anyhow::Result<()> {
    let mut config = Config::defaults();
    config.database_url = Some(url.to_owned());
    config.database_max_connections = 32;
    config.shutdown_grace = Duration::from_millis(200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = App::build(config).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(listener, async {
        let _ = stopped.await;
    }));
    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect()
        .await?;

    let enqueue_time = enqueue_all(&channel, sizes).await?;
    println!(
        "enqueue: {} tasks, {} producers: {:.0} tasks/s",
        sizes.tasks,
        sizes.producers,
        sizes.tasks as f64 / enqueue_time.as_secs_f64()
    );

    let started = Instant::now();
    let mut completed = HashSet::new();
    let mut claim_latencies = Vec::new();
    let drains = (0..sizes.workers).map(|index| drain(channel.clone(), index, sizes.batch));
    for result in futures::future::join_all(drains).await {
        let (ids, latencies) = result?;
        for id in ids {
            ensure!(completed.insert(id), "a task completed twice");
        }
        claim_latencies.extend(latencies);
    }
    let elapsed = started.elapsed();
    ensure!(completed.len() == sizes.tasks, "not every task completed");
    claim_latencies.sort();
    println!(
        "lease cycle (claim batch {}, start, complete): {} workers: {:.0} tasks/s",
        sizes.batch,
        sizes.workers,
        sizes.tasks as f64 / elapsed.as_secs_f64()
    );
    println!(
        "ClaimTask latency: p50 {:?}, p99 {:?} over {} calls",
        percentile(&claim_latencies, 0.50),
        percentile(&claim_latencies, 0.99),
        claim_latencies.len()
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}

async fn enqueue_all(channel: &Channel, sizes: &Sizes) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let per_producer = sizes.tasks / sizes.producers;
    let producers = (0..sizes.producers).map(|index| {
        let mut client = TaskServiceClient::new(channel.clone());
        let count = if index == 0 {
            per_producer + sizes.tasks % sizes.producers
        } else {
            per_producer
        };
        async move {
            for _ in 0..count {
                client
                    .enqueue_task(pb::EnqueueTaskRequest {
                        queue: "bench".into(),
                        payload: vec![7; 256],
                        ..Default::default()
                    })
                    .await?;
            }
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(producers).await {
        result?;
    }
    Ok(started.elapsed())
}

/// One runtime: claim, start and complete until the queue is empty.
async fn drain(
    channel: Channel,
    index: usize,
    batch: u32,
) -> anyhow::Result<(Vec<String>, Vec<Duration>)> {
    let mut worker = WorkerServiceClient::new(channel);
    let runtime_id = worker
        .register_runtime(pb::RegisterRuntimeRequest {
            name: format!("bench-{index}"),
            queues: vec!["bench".into()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .runtime
        .context("no runtime")?
        .id;
    let mut done = Vec::new();
    let mut latencies = Vec::new();
    loop {
        let asked = Instant::now();
        let claimed = worker
            .claim_task(pb::ClaimTaskRequest {
                runtime_id: runtime_id.clone(),
                max_tasks: Some(batch),
                wait: None,
            })
            .await?
            .into_inner()
            .tasks;
        latencies.push(asked.elapsed());
        if claimed.is_empty() {
            return Ok((done, latencies));
        }
        for task in claimed {
            let task_id = task.task.context("no task")?.id;
            worker
                .start_task(pb::StartTaskRequest {
                    task_id: task_id.clone(),
                    claim_token: task.claim_token.clone(),
                })
                .await?;
            worker
                .complete_task(pb::CompleteTaskRequest {
                    task_id: task_id.clone(),
                    claim_token: task.claim_token,
                    result: Vec::new(),
                })
                .await?;
            done.push(task_id);
        }
    }
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * quantile).round() as usize;
    sorted[index]
}
