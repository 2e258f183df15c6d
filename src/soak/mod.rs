//! `leasehold soak`: many faults at once, under load, then a checker that reads the whole
//! history (docs/RELIABILITY.md). It starts everything itself: a private PostgreSQL and Redis,
//! two replicas behind fault-injecting proxies, a producer, workers of its own (unary and
//! streamed) and `leasehold worker` daemons. It exits non-zero on any violation.

pub mod checker;
mod faults;
pub mod history;
mod proxy;
mod topology;
mod workers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sqlx::Connection as _;

use checker::{FinalTask, check};
pub use faults::Fault;
use faults::{ALL_FAULTS, inject, schedule};
use history::{Event, HistoryLog};
use proxy::FaultProxy;
use topology::{Postgres, Redis, Replica};
use workers::{Daemon, Mode, SdkWorker};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Seed of every random choice (fault times and kinds, proxy faults, task durations).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tasks the producer enqueues.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Workers of the soak's own (half unary, half streamed), besides two daemons.
    #[arg(long, default_value_t = 6)]
    workers: usize,
    /// How long load and faults last; the first 60% has the faults, then a quiet tail until
    /// every task is terminal (at most `--drain-deadline` more).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    drain_deadline: Duration,
    /// Fault kinds to inject (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Where the history, server logs and report go; a fresh temporary directory by default.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Server settings that make failures show within a soak's minutes.
const REPLICA_FLAGS: &[&str] = &[
    "--auth",
    "none",
    "--lease-duration",
    "5s",
    "--offline-after",
    "4s",
    "--heartbeat-interval",
    "1s",
    "--sweep-interval",
    "1s",
    "--dispatch-timeout",
    "20s",
    "--retry-backoff-base",
    "100ms",
    "--retry-backoff-max",
    "2s",
    "--shutdown-grace",
    "3s",
    "--log-format",
    "json",
];

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("leasehold-soak-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let report = soak(&args, &dir).await?;
    let report_path = dir.join("report.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(&report)?)?;
    println!("{report:#}");
    eprintln!("{}", summary(&report));
    eprintln!("history, logs and report in {}", dir.display());
    let violations = report["violations"].as_array().map_or(0, Vec::len);
    if violations > 0 {
        anyhow::bail!("{violations} violation(s)");
    }
    Ok(())
}

struct Topology<'a> {
    postgres: &'a Postgres,
    redis: Redis,
    replicas: Vec<Replica>,
    proxies: Vec<FaultProxy>,
}

/// The private PostgreSQL is stopped however the soak ends (its other processes die with
/// this one).
async fn soak(args: &SoakArgs, dir: &std::path::Path) -> anyhow::Result<Value> {
    let postgres = Postgres::start(dir).await?;
    let outcome = soak_on(args, dir, &postgres).await;
    if let Err(error) = postgres.stop().await {
        tracing::warn!(%error, "could not stop the soak's PostgreSQL");
    }
    outcome
}

async fn soak_on(
    args: &SoakArgs,
    dir: &std::path::Path,
    postgres: &Postgres,
) -> anyhow::Result<Value> {
    let faults = if args.faults.is_empty() {
        ALL_FAULTS.to_vec()
    } else {
        args.faults.clone()
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let redis = Redis::start().await?;
    migrate(&postgres.url()).await?;
    let mut flags: Vec<String> = REPLICA_FLAGS
        .iter()
        .map(|flag| (*flag).to_owned())
        .collect();
    flags.extend([
        "--database-url".into(),
        postgres.url(),
        "--redis-url".into(),
        redis.url(),
    ]);
    flags.extend(["--migrate".into(), "skip".into()]);
    let mut replicas = vec![
        Replica::new("replica-a", flags.clone(), dir)?,
        Replica::new("replica-b", flags, dir)?,
    ];
    let mut proxies = Vec::new();
    for replica in &mut replicas {
        replica.start()?;
        proxies.push(FaultProxy::start(replica.address(), rng.random()).await?);
    }
    if !faults.contains(&Fault::Network) {
        proxies.iter().for_each(FaultProxy::stop_faults);
    }
    wait_until_serving(&replicas).await?;
    let mut topology = Topology {
        postgres,
        redis,
        replicas,
        proxies,
    };

    let started = Instant::now();
    let history = Arc::new(HistoryLog::create(&dir.join("history.jsonl"), started)?);
    let channels = topology
        .proxies
        .iter()
        .map(|proxy| workers::channel(&proxy.address))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let producer = tokio::spawn(workers::produce(
        channels.clone(),
        history.clone(),
        args.tasks,
        args.duration.mul_f64(0.5),
    ));
    let mut load = Load {
        sdk: Vec::new(),
        daemons: Vec::new(),
        started: 0,
    };
    for _ in 0..args.workers {
        load.start_sdk_worker(&channels, &history, &mut rng);
    }
    for _ in 0..2 {
        load.start_daemon(&topology, dir)?;
    }

    let fault_window = args.duration.mul_f64(0.6);
    let schedule = schedule(&faults, fault_window, &mut rng);
    let mut injected: Vec<Value> = Vec::new();
    for (at, fault) in &schedule {
        tokio::time::sleep_until(tokio::time::Instant::from_std(started + *at)).await;
        let outcome = inject(
            *fault,
            &mut topology,
            &mut load,
            &channels,
            &history,
            dir,
            &mut rng,
        )
        .await;
        injected.push(json!({
            "at_s": started.elapsed().as_secs_f64(),
            "fault": fault,
            "error": outcome.err().map(|error| format!("{error:#}")),
        }));
    }
    let last_fault = started.elapsed();
    tokio::time::sleep_until(tokio::time::Instant::from_std(started + fault_window)).await;
    topology.proxies.iter().for_each(FaultProxy::stop_faults);
    let _ = producer.await;

    let deadline = started + args.duration + args.drain_deadline;
    let drained = wait_until_drained(&topology.postgres.url(), deadline).await;
    let elapsed = started.elapsed();
    for worker in &load.sdk {
        worker.kill();
    }
    for daemon in &mut load.daemons {
        daemon.kill().await;
    }
    history.flush();

    let events = history::read(&dir.join("history.jsonl"))?;
    let finals = final_tasks(&topology.postgres.url()).await?;
    let verdict = check(&events, &finals);
    let logs: Vec<PathBuf> = topology
        .replicas
        .iter()
        .map(|replica| replica.log().to_owned())
        .collect();
    let violations: Vec<Value> = verdict
        .violations
        .iter()
        .map(|violation| {
            let task_history: Vec<&Event> = events
                .iter()
                .filter(|event| event.task == violation.task)
                .collect();
            json!({
                "violation": violation,
                "history": task_history,
                "server_log_lines": log_lines_about(&logs, &violation.task),
            })
        })
        .collect();
    for replica in &mut topology.replicas {
        replica.terminate(Duration::from_secs(5)).await;
    }

    let mut fault_counts: BTreeMap<String, usize> = BTreeMap::new();
    for fault in &injected {
        *fault_counts
            .entry(fault["fault"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let proxy_counters = |read: fn(&proxy::ProxyCounters) -> u64| -> u64 {
        topology
            .proxies
            .iter()
            .map(|proxy| read(&proxy.counters))
            .sum()
    };
    if faults.contains(&Fault::Network) {
        fault_counts.insert(
            "network_resets".into(),
            proxy_counters(|c| c.resets.load(Ordering::Relaxed)) as usize,
        );
        fault_counts.insert(
            "network_lost_responses".into(),
            proxy_counters(|c| c.lost_responses.load(Ordering::Relaxed)) as usize,
        );
        fault_counts.insert(
            "network_delays".into(),
            proxy_counters(|c| c.delays.load(Ordering::Relaxed)) as usize,
        );
    }
    let completed = verdict.figures.tasks_completed;
    Ok(json!({
        "seed": args.seed,
        "sizes": { "tasks": args.tasks, "workers": args.workers, "daemons": 2, "duration_s": args.duration.as_secs_f64() },
        "faults_enabled": faults,
        "faults_injected": fault_counts,
        "fault_timeline": injected,
        "workers_started": load.started,
        "drained": drained,
        "drain_after_last_fault_s": elapsed.saturating_sub(last_fault).as_secs_f64(),
        "elapsed_s": elapsed.as_secs_f64(),
        "throughput_tasks_per_second": completed as f64 / elapsed.as_secs_f64(),
        "checks": verdict.counts,
        "figures": verdict.figures,
        "violations": violations,
    }))
}

/// The workers alive now, and how many were ever started.
struct Load {
    sdk: Vec<SdkWorker>,
    daemons: Vec<Daemon>,
    started: usize,
}

impl Load {
    fn start_sdk_worker(
        &mut self,
        channels: &[tonic::transport::Channel],
        history: &Arc<HistoryLog>,
        rng: &mut StdRng,
    ) {
        let index = self.started;
        self.started += 1;
        let mode = if index.is_multiple_of(2) {
            Mode::Unary
        } else {
            Mode::Stream
        };
        let name = format!("soak-{index}-{mode:?}").to_lowercase();
        let channel = channels[index % channels.len()].clone();
        self.sdk.push(SdkWorker::start(
            name,
            mode,
            channel,
            history.clone(),
            rng.random(),
        ));
    }

    fn start_daemon(
        &mut self,
        topology: &Topology<'_>,
        dir: &std::path::Path,
    ) -> anyhow::Result<()> {
        let index = self.started;
        self.started += 1;
        let proxy = &topology.proxies[index % topology.proxies.len()];
        let name = format!("soak-daemon-{index}");
        // The daemons run the worker SDK: half claim with long-polls, half over a stream.
        let unary = index.is_multiple_of(2);
        self.daemons.push(Daemon::start(
            name,
            &proxy.address,
            unary,
            &dir.join("daemons.log"),
        )?);
        Ok(())
    }
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    crate::store::postgres::schema::apply(&options, Default::default()).await
}

async fn wait_until_serving(replicas: &[Replica]) -> anyhow::Result<()> {
    for replica in replicas {
        let mut serving = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(replica.address())
                .await
                .is_ok()
            {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(serving, "{} never listened", replica.name);
    }
    Ok(())
}

/// Waits until no task is active (or the deadline); true when that happened.
async fn wait_until_drained(url: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if let Ok(mut connection) = sqlx::PgConnection::connect(url).await {
            let active: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE status IN ('QUEUED', 'DISPATCHED', 'RUNNING')",
            )
            .fetch_one(&mut connection)
            .await
            .unwrap_or(1);
            if active == 0 {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    false
}

async fn final_tasks(url: &str) -> anyhow::Result<Vec<FinalTask>> {
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .context("read the final tasks")?;
    let rows: Vec<(uuid::Uuid, String, i64, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT id, status, attempt, result FROM tasks")
            .fetch_all(&mut connection)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, status, attempt, result)| FinalTask {
            id: id.to_string(),
            status,
            attempt: u32::try_from(attempt).unwrap_or(0),
            result,
        })
        .collect())
}

/// Every server log line naming `task`, for a violation's report.
fn log_lines_about(logs: &[PathBuf], task: &str) -> Vec<String> {
    logs.iter()
        .filter_map(|log| std::fs::read_to_string(log).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|line| line.contains(task))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

fn summary(report: &Value) -> String {
    let mut text = String::new();
    for violation in report["violations"].as_array().into_iter().flatten() {
        text.push_str(&format!("VIOLATION {}\n", violation["violation"]));
        for event in violation["history"].as_array().into_iter().flatten() {
            text.push_str(&format!("  {event}\n"));
        }
        for line in violation["server_log_lines"]
            .as_array()
            .into_iter()
            .flatten()
        {
            text.push_str(&format!(
                "  server: {}\n",
                line.as_str().unwrap_or_default()
            ));
        }
    }
    text + &format!(
        "soak (seed {}): {} tasks, faults {}; checks {}; drained: {} ({:.1} s after the last fault); {:.0} tasks/s; executions per task mean {:.2}",
        report["seed"],
        report["figures"]["tasks_enqueued"],
        report["faults_injected"],
        report["checks"],
        report["drained"],
        report["drain_after_last_fault_s"].as_f64().unwrap_or(0.0),
        report["throughput_tasks_per_second"]
            .as_f64()
            .unwrap_or(0.0),
        report["figures"]["executions_per_task_mean"]
            .as_f64()
            .unwrap_or(0.0),
    )
}
