//! The sweeper's loop: one sweep (spec §6) every `--sweep-interval`, on whichever replica
//! holds the sweep lock, until cancelled.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::coordinator::Coordinator;
use crate::store::SweepReport;
use crate::telemetry::metrics::Metrics;

pub async fn run(coordinator: Arc<Coordinator>, interval: Duration, stop: CancellationToken) {
    let interval = interval.max(Duration::from_millis(1));
    // The first sweep waits one interval: a replica that just started has nothing to add to
    // what the running ones sweep.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Stage 5 looks for tasks that became available since the previous sweep this replica
    // ran; after a gap (another replica swept, or an error) it starts afresh.
    let mut due_since = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match coordinator.sweep(due_since).await {
            Ok(Some(report)) => {
                log(&report);
                count(coordinator.metrics(), &report);
                due_since = report.swept_at;
            }
            Ok(None) => {
                coordinator.metrics().sweep_ended("skipped");
                due_since = None;
            }
            Err(error) => {
                coordinator.metrics().sweep_ended("failed");
                tracing::warn!(%error, "sweep failed; trying again next tick");
                due_since = None;
            }
        }
    }
}

/// `leasehold_sweeps_total{outcome="led"}` and rows per stage.
fn count(metrics: &Metrics, report: &SweepReport) {
    metrics.sweep_ended("led");
    for stage in &report.failed_stages {
        metrics.sweeper_stage_failed(stage);
    }
    for (stage, rows) in [
        ("mark_offline", report.marked_offline.len()),
        ("runtime_offline", report.runtime_offline.len()),
        ("timeouts", report.timed_out.len()),
        ("runtime_gone", report.runtime_gone.len()),
        ("became_available", report.became_available.len()),
        ("retention", report.deleted_finished as usize),
    ] {
        metrics.sweeper_rows(stage, rows);
    }
}

fn log(report: &SweepReport) {
    let counts = [
        report.marked_offline.len(),
        report.runtime_offline.len(),
        report.timed_out.len(),
        report.runtime_gone.len(),
    ];
    if counts.iter().any(|count| *count > 0) {
        tracing::info!(
            marked_offline = counts[0],
            runtime_offline = counts[1],
            timed_out = counts[2],
            runtime_gone = counts[3],
            became_available = report.became_available.len(),
            "sweep"
        );
    }
}
