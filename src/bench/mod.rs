//! `leasehold bench`: starts `leasehold serve` processes over a scratch PostgreSQL database (and
//! Redis), runs the scenarios, measures the pgbench ceiling in the same run, and prints one JSON
//! object with every figure and each target beside it. See docs/PERFORMANCE.md.

mod ceiling;
mod console;
mod cpu;
mod history;
mod plans;
mod scenarios;
mod servers;

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use cpu::CpuTimes;
use scenarios::Wakeups;
use servers::{ScratchDatabase, ServerProcess};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// PostgreSQL in which a scratch database is created (and dropped) for the run.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Redis for the servers under test; without it the cache, cross-replica wake-ups and the
    /// idle figures are not what production sees.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Tasks per throughput scenario.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Concurrent workers (runtimes) in the lifecycle scenarios and pgbench clients.
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Concurrent producers in the enqueue scenario.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Credits of each claim stream in `lifecycle_stream`.
    #[arg(long, default_value_t = 8)]
    stream_credits: u32,
    /// Enqueue → `claimed` samples per wake-up scenario.
    #[arg(long, default_value_t = 1000)]
    wakeup_samples: usize,
    /// Idle runtimes (unary pollers, then one idle stream each).
    #[arg(long, default_value_t = 1000)]
    idle_runtimes: usize,
    /// How long each idle measurement lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// Finished tasks written into the table before the `history` scenario's second round.
    #[arg(long, default_value_t = 1_000_000)]
    history_rows: usize,
    /// Tasks in the table while the `console` scenario times the queue page.
    #[arg(long, default_value_t = 1_000_000)]
    console_rows: usize,
    /// Tiny sizes, a few seconds: shows every scenario still runs (CI). Its figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Runs only these scenarios (comma-separated); all of them by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    Enqueue,
    LifecycleUnary,
    Ceiling,
    LifecycleStream,
    Wakeup,
    Idle,
    /// The unary and streamed lifecycles with `--auth token` (runtime tokens) against the same
    /// with `--auth none`, in turns, on one database.
    Auth,
    /// The lifecycles on an empty table and on one holding `--history-rows` finished tasks;
    /// then retention keeping the table bounded under rounds of load.
    History,
    /// The claim's latency after `ANALYZE` on an empty table and a burst of `--tasks`,
    /// against the same after real statistics.
    Plans,
    /// The console's queue page with `--console-rows` tasks in the table.
    Console,
}

impl BenchArgs {
    fn runs(&self, scenario: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&scenario)
    }

    fn shrink_for_smoke(&mut self) {
        if self.smoke {
            self.tasks = 200;
            self.workers = 4;
            self.producers = 2;
            self.wakeup_samples = 20;
            self.idle_runtimes = 20;
            self.idle_window = Duration::from_secs(1);
            self.history_rows = 3_000;
            self.console_rows = 2_000;
        }
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    args.shrink_for_smoke();
    let database = ScratchDatabase::create(&args.database_url, "main").await?;
    let outcome = measure(&args, &database).await;
    database.drop_database().await?;
    let report = outcome?;
    println!("{report:#}");
    Ok(())
}

async fn measure(args: &BenchArgs, database: &ScratchDatabase) -> anyhow::Result<Value> {
    let redis = args.redis_url.as_deref();
    let server = ServerProcess::start(Some(&database.url), redis, &[]).await?;
    let client = server.client()?;
    let (workers, tasks) = (args.workers, args.tasks);
    let mut report = json!({
        "machine": machine(),
        "sizes": {
            "tasks": tasks, "workers": workers, "producers": args.producers,
            "stream_credits": args.stream_credits, "wakeup_samples": args.wakeup_samples,
            "idle_runtimes": args.idle_runtimes, "idle_window_s": args.idle_window.as_secs_f64(),
            "smoke": args.smoke, "redis": redis.is_some(),
        },
    });

    if args.runs(Scenario::Enqueue) {
        let single =
            scenarios::enqueue_singly(&client, "bench-single", tasks.min(2000), args.producers)
                .await?;
        let batched =
            scenarios::enqueue_in_batches(&client, "bench-unary", tasks, args.producers).await?;
        report["enqueue"] =
            json!({ "single_tasks_per_second": single, "batch_tasks_per_second": batched });
    }
    if args.runs(Scenario::LifecycleUnary) {
        if !args.runs(Scenario::Enqueue) {
            scenarios::enqueue_in_batches(&client, "bench-unary", tasks, args.producers).await?;
        }
        ServerProcess::vacuum(&database.url).await?;
        let cpu_before = CpuTimes::now(server.pid());
        let unary = scenarios::lifecycle_unary(&client, "bench-unary", workers).await?;
        report["lifecycle_unary"] = json!({
            "tasks_per_second": unary.tasks_per_second,
            "claim_p50_ms": unary.claim_latency.millis(0.50),
            "claim_p99_ms": unary.claim_latency.millis(0.99),
            "claims": unary.claim_latency.len(),
            "cpu": CpuTimes::now(server.pid()).since(&cpu_before),
        });
    }
    if args.runs(Scenario::Ceiling) {
        ServerProcess::vacuum(&database.url).await?;
        let ceiling =
            ceiling::measure(&client, &database.url, "bench-ceiling", workers, tasks).await;
        report["ceiling"] = match &ceiling {
            Ok(ceiling) => json!({
                "tasks_per_second": ceiling.tasks_per_second,
                "latency_average_ms": ceiling.latency_average_ms,
                "claim_statement_average_ms": ceiling.claim_average_ms,
                "method": "pgbench: the service's claim, start and complete SQL at the same concurrency",
            }),
            Err(error) => json!({ "tasks_per_second": null, "error": error.to_string() }),
        };
    }
    let unary_rate = report
        .pointer("/lifecycle_unary/tasks_per_second")
        .and_then(Value::as_f64);
    let ceiling_rate = report
        .pointer("/ceiling/tasks_per_second")
        .and_then(Value::as_f64);
    if let (Some(unary), Some(ceiling)) = (unary_rate, ceiling_rate) {
        report["ratio"] = json!(unary / ceiling);
    }
    if args.runs(Scenario::LifecycleStream) {
        let round = StreamRound {
            client: &client,
            database_url: &database.url,
            server_pid: server.pid(),
            workers,
            tasks,
            args,
        };
        let calls = StreamWorker::Calls { auto_start: false };
        let (streamed, mut figures) = round.run("bench-stream", calls).await?;
        figures["vs_unary"] = json!(unary_rate.map(|unary| streamed / unary));
        report["lifecycle_stream"] = figures;
        // The same with the streams' claims started by the claim (`auto_start`).
        let auto_start = StreamWorker::Calls { auto_start: true };
        let (auto_started, mut figures) = round.run("bench-stream-auto", auto_start).await?;
        figures["vs_stream"] = json!(auto_started / streamed);
        report["lifecycle_stream_auto_start"] = figures;
        // And with the completions carried on the streams (`StreamWrite`).
        let writes = StreamWorker::WritesOnStream;
        let (written, mut figures) = round.run("bench-stream-writes", writes).await?;
        figures["vs_stream"] = json!(written / streamed);
        report["lifecycle_stream_writes"] = figures;
    }
    if args.runs(Scenario::Wakeup) {
        let one_replica =
            scenarios::wakeup(&client, &client, "wake-one", 4, args.wakeup_samples).await?;
        let two_replicas = match redis {
            Some(_) => {
                let second = ServerProcess::start(Some(&database.url), redis, &[]).await?;
                let wakeups = scenarios::wakeup(
                    &client,
                    &second.client()?,
                    "wake-two",
                    4,
                    args.wakeup_samples,
                )
                .await?;
                Some(wakeups)
            }
            None => None,
        };
        report["wakeup"] = json!({
            "one_replica": latency_figures(&one_replica),
            "two_replicas": two_replicas.as_ref().map(latency_figures),
        });
    }
    if args.runs(Scenario::Idle) {
        report["idle"] = idle(args, database, &server, &client).await?;
    }
    if args.runs(Scenario::Auth) {
        report["auth"] = auth_overhead(args, database, &server).await?;
    }
    if args.runs(Scenario::History) {
        report["history"] = history::measure(args, database, &client).await?;
    }
    if args.runs(Scenario::Plans) {
        let redis = args.redis_url.as_deref();
        report["plans"] =
            plans::measure(&args.database_url, redis, args.tasks, args.producers).await?;
    }
    if args.runs(Scenario::Console) {
        report["console"] = console::measure(args).await?;
    }
    report["targets"] = targets(&report);
    Ok(report)
}

/// What credentials cost: the same lifecycles on a server with `--auth none` (`open`) and on
/// one with `--auth token` whose workers use their runtime tokens (`authenticated`). The
/// rounds go open, authenticated, authenticated, open, …, so that what drifts during the run
/// (the tasks table grows, the machine's other load) weighs on both sides alike.
async fn auth_overhead(
    args: &BenchArgs,
    database: &ScratchDatabase,
    open: &ServerProcess,
) -> anyhow::Result<Value> {
    let redis = args.redis_url.as_deref();
    let authenticated =
        ServerProcess::start_with_auth(Some(&database.url), redis, &[], true).await?;
    let sides = [
        ("open", open.client()?),
        ("authenticated", authenticated.client()?),
    ];
    let rounds = if args.smoke { 1 } else { 2 };
    let mut unary = [0.0_f64; 2];
    let mut streamed = [0.0_f64; 2];
    for round in 0..rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let (name, client) = &sides[side];
            let queue = format!("auth-{name}-{round}");
            let (throughput, rate) = lifecycle_pair(args, database, client, &queue).await?;
            unary[side] += throughput.tasks_per_second / f64::from(rounds);
            streamed[side] += rate / f64::from(rounds);
        }
    }
    Ok(json!({
        "rounds": rounds,
        "unary_tasks_per_second": { "open": unary[0], "authenticated": unary[1] },
        "stream_tasks_per_second": { "open": streamed[0], "authenticated": streamed[1] },
        "unary_ratio": unary[1] / unary[0],
        "stream_ratio": streamed[1] / streamed[0],
    }))
}

/// `--tasks` tasks through the unary lifecycle on `queue`, then as many through streams on
/// `<queue>-stream`, each from a vacuumed table: the unary figures and the streamed tasks/s.
/// One streamed lifecycle round on a fresh queue: its rate and figures (rate, CPU).
struct StreamRound<'a> {
    client: &'a crate::client::Client,
    database_url: &'a str,
    server_pid: Option<u32>,
    workers: usize,
    tasks: usize,
    args: &'a BenchArgs,
}

/// How the streamed lifecycle's workers drive their tasks.
#[derive(Clone, Copy)]
enum StreamWorker {
    /// StartTask (unless `auto_start`) and CompleteTask calls.
    Calls { auto_start: bool },
    /// Auto-started claims, completed by writes on the stream.
    WritesOnStream,
}

impl StreamRound<'_> {
    async fn run(&self, queue: &str, worker: StreamWorker) -> anyhow::Result<(f64, Value)> {
        let args = self.args;
        scenarios::enqueue_in_batches(self.client, queue, self.tasks, args.producers).await?;
        ServerProcess::vacuum(self.database_url).await?;
        let cpu_before = CpuTimes::now(self.server_pid);
        let (client, workers, credits) = (self.client, self.workers, args.stream_credits);
        let rate = match worker {
            StreamWorker::Calls { auto_start } => {
                scenarios::lifecycle_stream(client, queue, workers, credits, self.tasks, auto_start)
                    .await?
            }
            StreamWorker::WritesOnStream => {
                scenarios::lifecycle_stream_writes(client, queue, workers, credits, self.tasks)
                    .await?
            }
        };
        let cpu_after = CpuTimes::now(self.server_pid);
        let figures = json!({
            "tasks_per_second": rate,
            "cpu": cpu_after.since(&cpu_before),
            "cpu_ms_per_task": cpu_after.per_task(&cpu_before, self.tasks),
        });
        Ok((rate, figures))
    }
}

async fn lifecycle_pair(
    args: &BenchArgs,
    database: &ScratchDatabase,
    client: &crate::client::Client,
    queue: &str,
) -> anyhow::Result<(scenarios::Throughput, f64)> {
    scenarios::enqueue_in_batches(client, queue, args.tasks, args.producers).await?;
    ServerProcess::vacuum(&database.url).await?;
    let unary = scenarios::lifecycle_unary(client, queue, args.workers).await?;
    let stream_queue = format!("{queue}-stream");
    scenarios::enqueue_in_batches(client, &stream_queue, args.tasks, args.producers).await?;
    ServerProcess::vacuum(&database.url).await?;
    let streamed = scenarios::lifecycle_stream(
        client,
        &stream_queue,
        args.workers,
        args.stream_credits,
        args.tasks,
        false,
    )
    .await?;
    Ok((unary, streamed))
}

fn latency_figures(wakeups: &Wakeups) -> Value {
    let latencies = &wakeups.claimed;
    json!({
        "p50_ms": latencies.millis(0.50),
        "p99_ms": latencies.millis(0.99),
        "max_ms": latencies.millis(1.0),
        "samples": latencies.len(),
        "enqueue_call_p50_ms": wakeups.enqueue_call.millis(0.50),
        "enqueue_call_p99_ms": wakeups.enqueue_call.millis(0.99),
    })
}

/// Idle unary pollers, then the same runtimes holding one idle stream each: PostgreSQL
/// transactions per idle claim and per second, and the server's memory.
async fn idle(
    args: &BenchArgs,
    database: &ScratchDatabase,
    server: &ServerProcess,
    client: &crate::client::Client,
) -> anyhow::Result<Value> {
    // Seconds the statistics counters must stand still to count as settled (see
    // `settled_transactions`); a smoke run does not care about exact counts.
    let quiet = if args.smoke { 1 } else { 11 };
    let mut runtimes = Vec::with_capacity(args.idle_runtimes);
    for index in 0..args.idle_runtimes {
        runtimes.push(scenarios::register(client, format!("idle-{index}"), "bench-idle").await?);
    }
    // One claim each first: the verdicts the cache keeps come from these.
    scenarios::idle_unary_claims(client, "bench-idle", &runtimes, Duration::ZERO).await?;
    let before = database.settled_transactions(quiet).await?;
    let claims =
        scenarios::idle_unary_claims(client, "bench-idle", &runtimes, args.idle_window).await?;
    let after = database.settled_transactions(quiet).await?;
    let rss_before_streams = server.rss_mib();

    let streams = scenarios::open_idle_streams(|| server.client(), &runtimes).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let streams_before = database.settled_transactions(quiet).await?;
    tokio::time::sleep(args.idle_window).await;
    let streams_after = database.settled_transactions(quiet).await?;
    let rss_with_streams = server.rss_mib();
    for stream in streams {
        stream.abort();
    }
    Ok(json!({
        "unary_claims": claims,
        "transactions_during_claims": after - before,
        "transactions_per_idle_claim": (after - before) as f64 / claims.max(1) as f64,
        "streams": runtimes.len(),
        "transactions_per_second_with_idle_streams":
            (streams_after - streams_before) as f64 / args.idle_window.as_secs_f64(),
        "server_rss_mib_before_streams": rss_before_streams,
        "server_rss_mib_with_streams": rss_with_streams,
    }))
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_owned())
        });
    json!({ "cpus": cpus, "cpu": model, "build": if cfg!(debug_assertions) { "debug" } else { "release" } })
}

/// Each target of the performance issue next to its measured figure.
fn targets(report: &Value) -> Value {
    let figure = |path: &str| report.pointer(path).and_then(Value::as_f64);
    let at_least = |measured: Option<f64>, goal: f64| json!({ "goal": format!(">= {goal}"), "measured": measured, "met": measured.map(|m| m >= goal) });
    let at_most = |measured: Option<f64>, goal: f64| json!({ "goal": format!("<= {goal}"), "measured": measured, "met": measured.map(|m| m <= goal) });
    json!({
        "lifecycle_unary_vs_ceiling": at_least(figure("/ratio"), 0.7),
        "claim_p99_ms": at_most(figure("/lifecycle_unary/claim_p99_ms"), 10.0),
        "lifecycle_stream_vs_unary": at_least(figure("/lifecycle_stream/vs_unary"), 1.5),
        "wakeup_p50_ms_one_replica": at_most(figure("/wakeup/one_replica/p50_ms"), 2.0),
        "wakeup_p99_ms_one_replica": at_most(figure("/wakeup/one_replica/p99_ms"), 10.0),
        "wakeup_p99_ms_two_replicas": at_most(figure("/wakeup/two_replicas/p99_ms"), 20.0),
        "idle_transactions_per_claim": at_most(figure("/idle/transactions_per_idle_claim"), 0.01),
        "server_rss_mib_with_idle_streams": at_most(figure("/idle/server_rss_mib_with_streams"), 300.0),
        "enqueue_batch_tasks_per_second": at_least(figure("/enqueue/batch_tasks_per_second"), 10_000.0),
        "auth_unary_vs_open": at_least(figure("/auth/unary_ratio"), 0.95),
        "auth_stream_vs_open": at_least(figure("/auth/stream_ratio"), 0.95),
        "history_unary_vs_empty": at_least(figure("/history/unary_ratio"), 0.9),
        "history_stream_vs_empty": at_least(figure("/history/stream_ratio"), 0.9),
        "plans_claim_after_empty_statistics": at_most(figure("/plans/p50_ratio"), 2.0),
        "console_queue_page_p50_ms": at_most(figure("/console/queue_page_p50_ms"), 50.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_compare_each_figure_with_its_goal() {
        let report = json!({ "ratio": 0.8, "lifecycle_unary": { "claim_p99_ms": 12.0 } });
        let targets = targets(&report);
        assert_eq!(targets["lifecycle_unary_vs_ceiling"]["met"], true);
        assert_eq!(targets["claim_p99_ms"]["met"], false);
        assert_eq!(targets["wakeup_p50_ms_one_replica"]["met"], Value::Null);
    }
}
