//! `leasehold bench --smoke`: every scenario still runs and reports its figures. No figure is
//! judged here (CI machines are shared); docs/PERFORMANCE.md holds the measured ones.

use serde_json::Value;

#[tokio::test]
async fn the_bench_runs_every_scenario_in_smoke_mode() {
    let database_url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let redis_url = std::env::var("REDIS_URL").expect("REDIS_URL; scripts/test sets it");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "bench",
            "--smoke",
            "--database-url",
            &database_url,
            "--redis-url",
            &redis_url,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    for figure in [
        "/enqueue/single_tasks_per_second",
        "/enqueue/batch_tasks_per_second",
        "/lifecycle_unary/tasks_per_second",
        "/lifecycle_unary/claim_p99_ms",
        "/ceiling/tasks_per_second",
        "/ratio",
        "/lifecycle_stream/tasks_per_second",
        "/wakeup/one_replica/p50_ms",
        "/wakeup/two_replicas/p99_ms",
        "/idle/transactions_per_idle_claim",
        "/auth/unary_ratio",
        "/auth/stream_ratio",
        "/history/unary_ratio",
        "/history/stream_ratio",
        "/idle/transactions_per_second_with_idle_streams",
        "/idle/server_rss_mib_with_streams",
        "/lifecycle_stream_auto_start/tasks_per_second",
        "/lifecycle_stream_auto_start/cpu_ms_per_task/total",
        "/plans/p50_ratio",
        "/console/queue_page_p50_ms",
    ] {
        let value = report.pointer(figure).unwrap_or(&Value::Null);
        assert!(value.is_number(), "{figure} is not a number in {report:#}");
    }
    let targets = report["targets"].as_object().unwrap();
    assert_eq!(targets.len(), 15, "every target is reported");
    // Retention, sweeping every second, took the written history away under load.
    let rows = report["history"]["retention"]["table_rows_after_each_round"]
        .as_array()
        .unwrap();
    let (first, last) = (
        rows[0].as_i64().unwrap(),
        rows.last().unwrap().as_i64().unwrap(),
    );
    assert!(first >= 3_000, "{rows:?}");
    assert!(
        last < first / 2,
        "retention did not bound the table: {rows:?}"
    );
}
