//! Every metric leasehold records, as typed functions, each name defined once here and described
//! for Prometheus (`# HELP`) by [`describe`]. Call sites say what happened; this module says how
//! it is counted. The list of series is in docs/operations.md ("Metrics").

use std::sync::Arc;
use std::time::Duration;

use ::metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

const RPC_REQUESTS: &str = "leasehold_rpc_requests_total";
const RPC_DURATION: &str = "leasehold_rpc_duration_seconds";
const AUTH_DENIALS: &str = "leasehold_auth_denials_total";
const CALLS_SHED: &str = "leasehold_calls_shed_total";
const STALE_TOKEN_REJECTIONS: &str = "leasehold_stale_token_rejections_total";
const STREAM_SESSIONS_OPEN: &str = "leasehold_stream_sessions_open";
const CLAIM_CALLS: &str = "leasehold_claim_calls_total";
const TASKS_CLAIMED: &str = "leasehold_tasks_claimed_total";
const TASK_STARTS: &str = "leasehold_task_starts_total";
const TASK_COMPLETIONS: &str = "leasehold_task_completions_total";
const TASK_FAILURES: &str = "leasehold_task_failures_total";
const TASK_RETRIES: &str = "leasehold_task_retries_total";
const LEASE_EXPIRIES: &str = "leasehold_lease_expiries_total";
const QUEUE_TASKS: &str = "leasehold_queue_tasks";
const QUEUE_OLDEST_QUEUED_AGE: &str = "leasehold_queue_oldest_queued_age_seconds";
const SWEEPS: &str = "leasehold_sweeps_total";
const SWEEPER_ROWS: &str = "leasehold_sweeper_rows_total";
const SWEEPER_STAGE_FAILURES: &str = "leasehold_sweeper_stage_failures_total";
const STORE_CALL_DURATION: &str = "leasehold_store_call_duration_seconds";
const STORE_CONFLICT_RETRIES: &str = "leasehold_store_conflict_retries_total";
const SHARED_STATEMENT_WRITES: &str = "leasehold_shared_statement_writes";
const REDIS_CALL_DURATION: &str = "leasehold_redis_call_duration_seconds";
const REDIS_DEGRADED: &str = "leasehold_redis_degraded";
const SIGNS_OF_LIFE: &str = "leasehold_signs_of_life_total";
const LIVENESS_WRITE_FAILURES: &str = "leasehold_liveness_write_failures_total";
const BACKGROUND_TASK_RESTARTS: &str = "leasehold_background_task_restarts_total";

/// Registers every series' help text with the current recorder.
fn describe() {
    describe_counter!(RPC_REQUESTS, "RPCs answered, by method and gRPC code");
    describe_histogram!(
        RPC_DURATION,
        Unit::Seconds,
        "RPC latency, by method and gRPC code"
    );
    describe_counter!(
        AUTH_DENIALS,
        "Calls refused for their credential, by reason"
    );
    describe_counter!(
        CALLS_SHED,
        "Calls refused with OVERLOADED (--max-inflight-calls)"
    );
    describe_counter!(
        STALE_TOKEN_REJECTIONS,
        "Owner writes refused for a superseded claim, by reason"
    );
    describe_gauge!(
        STREAM_SESSIONS_OPEN,
        "Open StreamClaims sessions on this replica"
    );
    describe_counter!(
        TASKS_CLAIMED,
        "Tasks handed out by claims (unary and streamed)"
    );
    describe_counter!(TASK_STARTS, "Tasks started");
    describe_counter!(TASK_COMPLETIONS, "Tasks completed");
    describe_counter!(TASK_FAILURES, "Task failures, by failure reason");
    describe_counter!(
        TASK_RETRIES,
        "Failures that requeued the task, by failure reason"
    );
    describe_counter!(
        LEASE_EXPIRIES,
        "Expired leases requeued or failed, by cause"
    );
    describe_gauge!(
        QUEUE_TASKS,
        "Active tasks per queue and status (the sweeper refreshes it)"
    );
    describe_gauge!(
        QUEUE_OLDEST_QUEUED_AGE,
        Unit::Seconds,
        "Age of the oldest QUEUED task per queue"
    );
    describe_counter!(SWEEPS, "Sweeper ticks, by outcome (led, skipped, failed)");
    describe_counter!(SWEEPER_ROWS, "Rows the sweep changed, by stage");
    describe_counter!(
        SWEEPER_STAGE_FAILURES,
        "Sweeper stages that failed, by stage"
    );
    describe_histogram!(
        STORE_CALL_DURATION,
        Unit::Seconds,
        "Store calls, by operation and outcome"
    );
    describe_counter!(
        STORE_CONFLICT_RETRIES,
        "Store calls retried after a serialization conflict"
    );
    describe_histogram!(
        SHARED_STATEMENT_WRITES,
        "Owner writes sharing one statement, by kind"
    );
    describe_histogram!(REDIS_CALL_DURATION, Unit::Seconds, "Redis calls");
    describe_gauge!(REDIS_DEGRADED, "1 while Redis is out of reach, else 0");
    describe_counter!(SIGNS_OF_LIFE, "Runtimes' signs of life recorded");
    describe_counter!(
        LIVENESS_WRITE_FAILURES,
        "Signs of life PostgreSQL could not record"
    );
    describe_counter!(
        BACKGROUND_TASK_RESTARTS,
        "Background duties restarted after a panic, by task"
    );
}

/// Latency buckets (seconds) of every duration histogram: 0.5ms to 10s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One server's metrics: every series it records, rendered as Prometheus text on `/metrics`.
/// Each server owns its handle (nothing is process-wide), so two servers in one process, as
/// in the tests, count apart. Cloning is cheap and shares the series.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // `set_buckets` refuses only an empty list, which ours is not.
        let builder = PrometheusBuilder::new();
        let recorder = match builder.set_buckets(&LATENCY_BUCKETS) {
            Ok(with_buckets) => with_buckets,
            Err(_) => PrometheusBuilder::new(),
        }
        .build_recorder();
        let metrics = Metrics {
            recorder: Arc::new(recorder),
        };
        metrics.record(describe);
        metrics
    }

    /// Every series in the Prometheus text format.
    pub fn render(&self) -> String {
        let handle = self.recorder.handle();
        handle.run_upkeep();
        handle.render()
    }

    /// Runs `write` with this server's recorder as the one the `metrics` macros use.
    fn record<T>(&self, write: impl FnOnce() -> T) -> T {
        ::metrics::with_local_recorder(&*self.recorder, write)
    }

    /// One more open claim stream, until the guard is dropped.
    pub fn stream_session_open(&self) -> StreamSession {
        self.record(|| gauge!(STREAM_SESSIONS_OPEN).increment(1.0));
        StreamSession(self.clone())
    }

    pub fn rpc_answered(&self, method: String, code: &'static str, took: Duration) {
        self.record(|| {
            counter!(RPC_REQUESTS, "method" => method.clone(), "code" => code).increment(1);
            histogram!(RPC_DURATION, "method" => method, "code" => code).record(took.as_secs_f64());
        });
    }

    pub fn auth_denied(&self, reason: &str) {
        self.record(|| {
            counter!(AUTH_DENIALS, "reason" => reason.to_owned()).increment(1);
        });
    }

    pub fn call_shed(&self) {
        self.record(|| {
            counter!(CALLS_SHED).increment(1);
        });
    }

    pub fn stale_token_rejected(&self, reason: &str) {
        self.record(|| {
            counter!(STALE_TOKEN_REJECTIONS, "reason" => reason.to_owned()).increment(1);
        });
    }

    /// `answered_by`: `cache` (the empty-claim cache, no PostgreSQL) or `store`.
    pub fn claim_answered(&self, answered_by: &'static str) {
        self.record(|| {
            counter!(CLAIM_CALLS, "answered_by" => answered_by).increment(1);
        });
    }

    pub fn tasks_claimed(&self, count: usize) {
        self.record(|| {
            counter!(TASKS_CLAIMED).increment(count as u64);
        });
    }

    pub fn tasks_started(&self, count: usize) {
        self.record(|| {
            counter!(TASK_STARTS).increment(count as u64);
        });
    }

    pub fn task_completed(&self) {
        self.record(|| {
            counter!(TASK_COMPLETIONS).increment(1);
        });
    }

    pub fn task_failed(&self, reason: &'static str, retried: bool) {
        self.record(|| {
            counter!(TASK_FAILURES, "reason" => reason).increment(1);
            if retried {
                counter!(TASK_RETRIES, "reason" => reason).increment(1);
            }
        });
    }

    /// `cause`: `preflight` (requeued), `poison` (failed by the poison guard), `stream` (a stream's
    /// unstarted claim given back).
    pub fn lease_expired(&self, cause: &'static str) {
        self.record(|| {
            counter!(LEASE_EXPIRIES, "cause" => cause).increment(1);
        });
    }

    pub fn queue_depth(
        &self,
        queue: &str,
        queued: u64,
        dispatched: u64,
        running: u64,
        oldest_queued_age: Option<Duration>,
    ) {
        self.record(|| {
            for (status, count) in [
                ("QUEUED", queued),
                ("DISPATCHED", dispatched),
                ("RUNNING", running),
            ] {
                gauge!(QUEUE_TASKS, "queue" => queue.to_owned(), "status" => status)
                    .set(count as f64);
            }
            gauge!(QUEUE_OLDEST_QUEUED_AGE, "queue" => queue.to_owned())
                .set(oldest_queued_age.map_or(0.0, |age| age.as_secs_f64()));
        });
    }

    /// `outcome`: `led`, `skipped` (another replica leads), `failed`.
    pub fn sweep_ended(&self, outcome: &'static str) {
        self.record(|| {
            counter!(SWEEPS, "outcome" => outcome).increment(1);
        });
    }

    pub fn sweeper_rows(&self, stage: &'static str, rows: usize) {
        self.record(|| {
            counter!(SWEEPER_ROWS, "stage" => stage).increment(rows as u64);
        });
    }

    pub fn sweeper_stage_failed(&self, stage: &'static str) {
        self.record(|| {
            counter!(SWEEPER_STAGE_FAILURES, "stage" => stage).increment(1);
        });
    }

    pub fn store_call(&self, operation: &'static str, succeeded: bool, took: Duration) {
        self.record(|| {
            let outcome = if succeeded { "ok" } else { "error" };
            histogram!(STORE_CALL_DURATION, "operation" => operation, "outcome" => outcome)
                .record(took.as_secs_f64());
        });
    }

    pub fn store_conflict_retried(&self) {
        self.record(|| {
            counter!(STORE_CONFLICT_RETRIES).increment(1);
        });
    }

    pub fn shared_statement(&self, kind: &'static str, writes: usize) {
        self.record(|| {
            histogram!(SHARED_STATEMENT_WRITES, "kind" => kind).record(writes as f64);
        });
    }

    pub fn redis_call(&self, took: Duration) {
        self.record(|| {
            histogram!(REDIS_CALL_DURATION).record(took.as_secs_f64());
        });
    }

    pub fn redis_degraded(&self, degraded: bool) {
        self.record(|| {
            gauge!(REDIS_DEGRADED).set(if degraded { 1.0 } else { 0.0 });
        });
    }

    pub fn signs_of_life(&self, runtimes: usize) {
        self.record(|| {
            counter!(SIGNS_OF_LIFE).increment(runtimes as u64);
        });
    }

    pub fn liveness_write_failed(&self) {
        self.record(|| {
            counter!(LIVENESS_WRITE_FAILURES).increment(1);
        });
    }

    pub fn background_task_restarted(&self, task: &'static str) {
        self.record(|| {
            counter!(BACKGROUND_TASK_RESTARTS, "task" => task).increment(1);
        });
    }
}

/// Counts a claim stream as open while it lives.
pub struct StreamSession(Metrics);

impl Drop for StreamSession {
    fn drop(&mut self) {
        self.0
            .record(|| gauge!(STREAM_SESSIONS_OPEN).decrement(1.0));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::Metrics;

    #[test]
    fn two_servers_count_apart() {
        let (one, other) = (Metrics::new(), Metrics::new());
        one.task_completed();
        one.task_completed();
        assert!(one.render().contains("leasehold_task_completions_total 2"));
        assert!(!other.render().contains("leasehold_task_completions_total"));
        // Each handle carries the help text.
        other.task_completed();
        assert!(
            other
                .render()
                .contains("# HELP leasehold_task_completions_total Tasks completed")
        );
    }

    /// `leasehold_…` names in `text` as written between backticks or quotes.
    fn names_in(text: &str, quote: char) -> BTreeSet<String> {
        text.split(quote)
            .filter(|word| {
                word.starts_with("leasehold_")
                    && !word.ends_with('_')
                    && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_series_is_documented_and_every_documented_series_exists() {
        let defined = names_in(include_str!("metrics.rs"), '"');
        let operations = include_str!("../../docs/operations.md");
        let section = operations
            .split("\n## Metrics")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("docs/operations.md has a Metrics section");
        let table: String = section
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|line| line.split(" | ").next().unwrap_or_default())
            .collect();
        let documented = names_in(&table, '`');
        assert_eq!(defined, documented);
    }
}
