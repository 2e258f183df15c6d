//! The ceiling: the service's own claim, start and complete SQL run by `pgbench` straight
//! against PostgreSQL, at the same concurrency, with no gRPC, no Rust and no Redis in the way.
//! `ratio = service / ceiling` says how much of what the database can do the service delivers.

use std::path::PathBuf;

use anyhow::Context;
use tokio::process::Command;

use super::scenarios;
use crate::client::Client;
use crate::store::postgres::statements;

/// One task per pgbench transaction, as the service does it alone: three statements, each its
/// own transaction: the store's own claim, StartTask and CompleteTask statements
/// (`store/postgres/sql`), bound to one task each (the service may share a start or complete
/// statement between tasks). The runtime is looked up by name (`ceiling-<client>`), a
/// unique-index probe per task.
fn pgbench_script() -> anyhow::Result<String> {
    let runtime = "(SELECT id FROM runtimes WHERE name = 'ceiling-' || :client_id)";
    // The claim's rows are read into pgbench variables: only the id and the token.
    let claim = statements::CLAIM_MANY.replacen(
        "(claims.task_row).*",
        "(claims.task_row).id AS task_id, (claims.task_row).claim_token AS token",
        1,
    );
    anyhow::ensure!(
        claim != statements::CLAIM_MANY,
        "the claim statement changed shape"
    );
    let claim = bind(
        &claim,
        &[
            &format!("ARRAY[{runtime}]"),
            "ARRAY[1]",
            "ARRAY[false]",
            "ARRAY[interval '10 seconds']",
            "interval '60 seconds'",
            "5",
        ],
    );
    let start = bind(
        statements::START_MANY,
        &["ARRAY[':task_id']", "ARRAY[':token']", "ARRAY[NULL]"],
    );
    let complete = bind(
        statements::COMPLETE_MANY,
        &[
            "ARRAY[':task_id']",
            "ARRAY[':token']",
            "ARRAY[''::bytea]",
            "ARRAY[NULL]",
        ],
    );
    Ok(format!("{claim} \\gset\n{start};\n{complete};\n"))
}

/// `statement` with `$1`, `$2`, … replaced by `arguments`, on one line (a pgbench command).
fn bind(statement: &str, arguments: &[&str]) -> String {
    let mut bound = statement.to_owned();
    // From the highest number down, so `$1` never matches the start of `$10`.
    for (index, argument) in arguments.iter().enumerate().rev() {
        bound = bound.replace(&format!("${}", index + 1), argument);
    }
    bound.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn pgbench() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("pgbench"))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| Some(entry.ok()?.path().join("bin/pgbench")))
            .filter(|candidate| candidate.is_file())
            .collect();
        installed.sort();
        installed.pop()
    })
}

pub(super) struct Ceiling {
    pub(super) tasks_per_second: f64,
    /// pgbench's average time of one task's three statements, in milliseconds.
    pub(super) latency_average_ms: Option<f64>,
    /// Of which the claim statement's, on average.
    pub(super) claim_average_ms: Option<f64>,
}

/// Enqueues `tasks` tasks into `queue` through the service, registers one runtime per pgbench
/// client, then lets pgbench claim, start and complete them.
pub(super) async fn measure(
    client: &Client,
    database_url: &str,
    queue: &str,
    workers: usize,
    tasks: usize,
) -> anyhow::Result<Ceiling> {
    let pgbench =
        pgbench().context("pgbench not found (Debian: postgresql-contrib / postgresql-client)")?;
    for index in 0..workers {
        scenarios::register(client, format!("ceiling-{index}"), queue).await?;
    }
    scenarios::enqueue_in_batches(client, queue, tasks, 4).await?;
    let script = std::env::temp_dir().join(format!("leasehold-ceiling-{}.sql", std::process::id()));
    let text = pgbench_script()?;
    // pgbench reports each command by its first 128 characters or so: the claim by its start.
    let claim_marker: String = text.chars().take(40).collect();
    std::fs::write(&script, &text)?;
    let per_client = tasks / workers;
    let output = Command::new(pgbench)
        .args([
            "--no-vacuum",
            "--protocol",
            "simple",
            "--report-per-command",
        ])
        .args(["--client", &workers.to_string(), "--jobs", "2"])
        .args(["--transactions", &per_client.to_string()])
        .arg("--file")
        .arg(&script)
        .arg(database_url)
        .output()
        .await?;
    let _ = std::fs::remove_file(&script);
    let printed = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}{}",
        printed,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(Ceiling {
        tasks_per_second: tasks_per_second(&printed).context("pgbench printed no tps")?,
        latency_average_ms: latency_average(&printed),
        claim_average_ms: command_average(&printed, &claim_marker),
    })
}

/// The average latency of the script's command containing `marker`, from the per-command
/// report (`   1.140   0  SELECT … leasehold_claim(…`).
fn command_average(report: &str, marker: &str) -> Option<f64> {
    report
        .lines()
        .filter(|line| line.contains(marker))
        .find_map(|line| line.split_whitespace().next()?.parse().ok())
}

/// The `latency average = N ms` line of pgbench's report.
fn latency_average(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|line| line.starts_with("latency average = "))?;
    line.trim_start_matches("latency average = ")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The `tps = N (without initial connection time)` line of pgbench's report.
fn tasks_per_second(report: &str) -> Option<f64> {
    report
        .lines()
        .find(|line| line.starts_with("tps = ") && line.contains("without initial connection"))?
        .trim_start_matches("tps = ")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_binds_every_parameter_of_the_stores_statements() {
        let script = pgbench_script().unwrap();
        assert_eq!(script.lines().count(), 3, "{script}");
        assert!(!script.contains('$'), "an unbound parameter in {script}");
        assert!(script.lines().next().unwrap().ends_with("\\gset"));
        assert!(
            script.contains("leasehold_claim_many"),
            "the claim the service runs"
        );
    }

    #[test]
    fn the_rate_comes_from_the_tps_line() {
        let report = "number of failed transactions: 0 (0.000%)\n\
                      latency average = 9.1 ms\n\
                      initial connection time = 12.3 ms\n\
                      tps = 1754.321 (without initial connection time)\n";
        assert_eq!(tasks_per_second(report), Some(1754.321));
        assert_eq!(latency_average(report), Some(9.1));
        assert_eq!(tasks_per_second("nothing"), None);
    }

    #[test]
    fn the_claim_latency_comes_from_the_per_command_report() {
        let report = "statement latencies in milliseconds and failures:\n\
                      \x20        7.912           0  SELECT id AS task_id FROM leasehold_claim((SELECT 1)\n\
                      \x20        3.001           0  UPDATE tasks SET status = 'RUNNING'\n";
        assert_eq!(command_average(report, "leasehold_claim"), Some(7.912));
        assert_eq!(command_average(report, "absent"), None);
    }
}
