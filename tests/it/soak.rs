//! `leasehold soak`, short (CI's budget): every fault kind at least once, under load, and the
//! checker finds nothing. The long run is by hand (docs/RELIABILITY.md).

use serde_json::Value;

#[tokio::test]
async fn a_short_soak_with_every_fault_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("leasehold-soak-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let seconds = std::env::var("SOAK_SECONDS").unwrap_or_else(|_| "45".into());
    let tasks = std::env::var("SOAK_TASKS").unwrap_or_else(|_| "300".into());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args([
            "soak",
            "--seed",
            "11",
            "--workers",
            "4",
            "--drain-deadline",
            "90s",
        ])
        .args(["--tasks", &tasks, "--duration", &format!("{seconds}s")])
        .arg("--dir")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let injected = &report["faults_injected"];
    for fault in [
        "replica_kill",
        "replica_term",
        "redis_restart",
        "worker_kill",
    ] {
        assert!(
            injected[fault].as_u64() >= Some(1),
            "{fault} never injected: {injected}"
        );
    }
    assert!(
        injected["postgres_restart"].as_u64() >= Some(2),
        "{injected}"
    );
    let network = injected["network_resets"].as_u64().unwrap_or(0)
        + injected["network_lost_responses"].as_u64().unwrap_or(0);
    assert!(network >= 1, "no network fault happened: {injected}");
    for check in [
        "lost",
        "double_completion",
        "stale_write_accepted",
        "result_mismatch",
    ] {
        assert_eq!(report["checks"][check], 0, "{report:#}");
    }
    assert_eq!(report["drained"], true);
    let tasks: u64 = tasks.parse().unwrap();
    assert_eq!(report["figures"]["tasks_enqueued"].as_u64(), Some(tasks));
    assert!(
        report["fault_timeline"]
            .as_array()
            .unwrap()
            .iter()
            .all(|fault| fault["error"].is_null()),
        "a fault could not be injected: {report:#}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
