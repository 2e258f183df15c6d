//! The `leasehold` binary's client subcommands (`task`, `queue`, `runtime`, `worker`) as
//! separate processes against a real server.

use std::process::{Output, Stdio};
use std::time::Duration;

use leasehold::proto as pb;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::harness::{EVENTUALLY, TestServer, status_of, wait_for_task};

fn leasehold(server: &TestServer) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_leasehold"));
    command
        .env("LEASEHOLD_SERVER", format!("http://{}", server.address))
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .kill_on_drop(true);
    command
}

/// Runs an operator command to its end.
async fn run(server: &TestServer, args: &[&str]) -> Output {
    leasehold(server).args(args).output().await.unwrap()
}

/// Runs an operator command that must succeed with `--output json`, and parses what it printed.
async fn json(server: &TestServer, args: &[&str]) -> Value {
    let output = run(server, &[args, &["--output", "json"]].concat()).await;
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[sqlx::test]
async fn operator_commands_round_trip_as_json(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = TestServer::start(pool, connect).await;
    let enqueue = [
        "task",
        "enqueue",
        "--queue",
        "ops",
        "--payload",
        "hello",
        "--metadata",
        "team=infra",
        "--priority",
        "-3",
        "--max-attempts",
        "5",
        "--idempotency-key",
        "once",
    ];
    let task = json(&server, &enqueue).await;
    let id = task["id"].as_str().unwrap().to_owned();
    assert_eq!(task["status"], "TASK_STATUS_QUEUED");
    assert_eq!(
        task["payload"], "aGVsbG8=",
        "bytes are base64, as in proto3 JSON"
    );
    assert_eq!(task["metadata"]["team"], "infra");
    assert_eq!(task["priority"], -3);
    assert_eq!(task["maxAttempts"], 5);
    assert_eq!(task["deduplicated"], false);
    let again = json(&server, &enqueue).await;
    assert_eq!(
        (again["id"].as_str(), &again["deduplicated"]),
        (Some(id.as_str()), &Value::Bool(true))
    );

    assert_eq!(
        json(&server, &["task", "get", &id]).await["id"],
        id.as_str()
    );
    let listed = json(
        &server,
        &["task", "list", "--queue", "ops", "--status", "queued"],
    )
    .await;
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1);
    let none = json(
        &server,
        &["task", "list", "--queue", "ops", "--status", "running"],
    )
    .await;
    assert!(none["tasks"].as_array().unwrap().is_empty());

    let cancelled = json(&server, &["task", "cancel", &id]).await;
    assert_eq!(cancelled["status"], "TASK_STATUS_CANCELLED");
    let retried = json(&server, &["task", "retry", &id]).await;
    assert_eq!(
        (&retried["status"], &retried["attempt"]),
        (&Value::from("TASK_STATUS_QUEUED"), &Value::from(1))
    );

    let updated = json(
        &server,
        &[
            "queue",
            "update",
            "ops",
            "--paused",
            "true",
            "--max-concurrent",
            "3",
        ],
    )
    .await;
    assert_eq!(
        (&updated["paused"], &updated["maxConcurrent"]),
        (&Value::Bool(true), &Value::from(3))
    );
    let described = json(&server, &["queue", "describe", "ops"]).await;
    assert_eq!(described["counts"]["queued"], 1);
    assert!(described["oldestQueuedAt"].is_string());

    server.register("ops-runtime", &["ops"]).await;
    let runtimes = json(&server, &["runtime", "list", "--status", "online"]).await;
    assert_eq!(runtimes["runtimes"][0]["name"], "ops-runtime");
    assert_eq!(runtimes["runtimes"][0]["status"], "RUNTIME_STATUS_ONLINE");
}

#[sqlx::test]
async fn operator_tables_read_well_and_errors_are_typed(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let mut enqueue = leasehold(&server)
        .args(["task", "enqueue", "--queue", "ops", "--payload-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    enqueue
        .stdin
        .take()
        .unwrap()
        .write_all(b"from stdin")
        .await
        .unwrap();
    let enqueued = enqueue.wait_with_output().await.unwrap();
    assert!(
        text(&enqueued.stdout).contains("payload:    from stdin"),
        "{}",
        text(&enqueued.stdout)
    );

    let table = run(&server, &["task", "list", "--queue", "ops"]).await;
    let table = text(&table.stdout);
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("QUEUE") && header.contains("STATUS"));
    assert!(table.lines().nth(1).unwrap().contains("QUEUED"));

    let unknown = run(
        &server,
        &["task", "get", "00000000-0000-4000-8000-000000000000"],
    )
    .await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("TASK_NOT_FOUND"),
        "{}",
        text(&unknown.stderr)
    );
    let malformed = run(&server, &["task", "cancel", "not-a-uuid"]).await;
    assert!(
        text(&malformed.stderr).contains("INVALID_FIELD"),
        "{}",
        text(&malformed.stderr)
    );
    let bad_flag = run(
        &server,
        &["task", "enqueue", "--queue", "ops", "--metadata", "novalue"],
    )
    .await;
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(text(&bad_flag.stderr).contains("KEY=VALUE"));
    let queued = server.describe_queue("ops").await.counts.unwrap().queued;
    assert_eq!(queued, 1, "rejected input stored nothing");

    // Bulk operations by filter, with a dry run first.
    let bulk = ["task", "cancel-all", "--queue", "ops", "--status", "queued"];
    let would = json(&server, &[&bulk[..], &["--dry-run"]].concat()).await;
    assert_eq!(
        (&would["matched"], &would["changed"]),
        (&1.into(), &0.into())
    );
    let said = text(
        &run(&server, &[&bulk[..], &["--dry-run"]].concat())
            .await
            .stdout,
    );
    assert_eq!(said.trim(), "1 tasks would change (dry run)");
    let done = json(&server, &bulk).await;
    assert_eq!((&done["matched"], &done["changed"]), (&1.into(), &1.into()));
    let redriven = json(&server, &["task", "retry-all", "--queue", "ops"]).await;
    assert_eq!(redriven["changed"], 1);
    let queued = server.describe_queue("ops").await.counts.unwrap().queued;
    assert_eq!(queued, 1, "cancelled, then redriven");
}

/// A task script: its payload picks what it does.
const SCRIPT: &str = r#"
case "$(cat)" in
  ok) printf '%s %s %s %s' "$LEASEHOLD_TASK_ID" "$LEASEHOLD_TASK_ATTEMPT" "$LEASEHOLD_TASK_QUEUE" "$LEASEHOLD_META_COLOR" ;;
  flaky) echo "flaky failure" >&2; exit 3 ;;
  bad) echo "bad input" >&2; exit 4 ;;
  slow) trap 'echo terminated > "$LEASEHOLD_META_MARKER"; exit 143' TERM
        sleep 30 </dev/null >/dev/null 2>&1 &
        wait ;;
esac
"#;

fn start_worker(server: &TestServer) -> Child {
    leasehold(server)
        .args([
            "worker",
            "--queue",
            "daemon",
            "--concurrency",
            "4",
            "--name",
            "daemon-1",
        ])
        .args([
            "--permanent-exit-code",
            "4",
            "--kill-grace",
            "5s",
            "--",
            "sh",
            "-c",
            SCRIPT,
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn enqueue(
    server: &TestServer,
    payload: &str,
    metadata: &[(&str, &str)],
    max_attempts: u32,
) -> String {
    let request = pb::EnqueueTaskRequest {
        queue: "daemon".into(),
        payload: payload.as_bytes().to_vec(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        max_attempts,
        ..Default::default()
    };
    server.enqueue(request).await.id
}

#[sqlx::test]
async fn the_worker_daemon_runs_a_command_per_task(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = TestServer::start(pool, connect).await;
    let mut worker = start_worker(&server);
    let marker = std::env::temp_dir().join(format!("leasehold-marker-{}", uuid::Uuid::new_v4()));
    let marker_text = marker.to_str().unwrap();

    let ok = enqueue(&server, "ok", &[("color", "blue")], 0).await;
    let flaky = enqueue(&server, "flaky", &[], 2).await;
    let bad = enqueue(&server, "bad", &[], 3).await;
    let slow = enqueue(&server, "slow", &[("marker", marker_text)], 0).await;

    let done = wait_for_task(&server, &ok, |task| {
        status_of(task) == pb::TaskStatus::Completed
    })
    .await;
    assert_eq!(text(&done.result), format!("{ok} 1 daemon blue"));

    let retried = wait_for_task(&server, &flaky, |task| task.attempt == 2).await;
    assert!(
        retried.error.contains("exit code 3") && retried.error.contains("flaky failure"),
        "{retried:?}"
    );

    let failed = wait_for_task(&server, &bad, |task| {
        status_of(task) == pb::TaskStatus::Failed
    })
    .await;
    assert_eq!(failed.attempt, 1, "exit code 4 is permanent: no retry");
    assert!(failed.error.contains("bad input"), "{failed:?}");

    wait_for_task(&server, &slow, |task| {
        status_of(task) == pb::TaskStatus::Running
    })
    .await;
    server.cancel(&slow).await;
    // The shell creates the file before it writes to it: wait for the words, not the file.
    let said = crate::harness::eventually("the child got SIGTERM", EVENTUALLY, async || {
        std::fs::read_to_string(&marker)
            .ok()
            .filter(|said| said.ends_with('\n'))
    })
    .await;
    assert_eq!(said.trim(), "terminated");
    let _ = std::fs::remove_file(&marker);

    let pid = nix::unistd::Pid::from_raw(worker.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "the daemon exits 0 after SIGTERM: {exit:?}");
    let runtimes = server.runtimes(Some(pb::RuntimeStatus::Offline)).await;
    assert!(
        runtimes.iter().any(|runtime| runtime.name == "daemon-1"),
        "it deregistered"
    );
}

/// `leasehold key create|list|revoke`, and the operator commands carrying a token from
/// `LEASEHOLD_TOKEN` or `--token-file`.
#[sqlx::test]
async fn keys_are_managed_from_the_command_line(pool: PgPoolOptions, connect: PgConnectOptions) {
    use crate::auth::{ADMIN, admin_token_file, with_tokens};
    let server = TestServer::start_with(pool, connect, with_tokens(admin_token_file(ADMIN))).await;
    let as_token = |token: &str, args: &[&str]| {
        let mut command = leasehold(&server);
        command
            .env("LEASEHOLD_TOKEN", token)
            .args(args)
            .args(["--output", "json"]);
        command
    };

    let created = as_token(
        ADMIN,
        &["key", "create", "producer", "--scope", "enqueue:ops*"],
    )
    .output()
    .await
    .unwrap();
    assert!(created.status.success(), "{}", text(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("lhk_"));

    let listed = as_token(ADMIN, &["key", "list"]).output().await.unwrap();
    let listed_text = text(&listed.stdout);
    assert!(listed_text.contains(&key_id) && !listed_text.contains(&token));

    let token_file = std::env::temp_dir().join(format!("leasehold-key-{key_id}"));
    std::fs::write(&token_file, &token).unwrap();
    let enqueued = leasehold(&server)
        .env_remove("LEASEHOLD_TOKEN")
        .args([
            "task",
            "enqueue",
            "--queue",
            "ops",
            "--payload",
            "x",
            "--token-file",
        ])
        .arg(&token_file)
        .output()
        .await
        .unwrap();
    assert!(enqueued.status.success(), "{}", text(&enqueued.stderr));
    let outside = as_token(
        &token,
        &["task", "enqueue", "--queue", "billing", "--payload", "x"],
    )
    .output()
    .await
    .unwrap();
    assert!(!outside.status.success());
    assert!(text(&outside.stderr).contains("SCOPE_MISSING"));

    let revoked = as_token(ADMIN, &["key", "revoke", &key_id])
        .output()
        .await
        .unwrap();
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    let refused = as_token(
        &token,
        &["task", "enqueue", "--queue", "ops", "--payload", "x"],
    )
    .output()
    .await
    .unwrap();
    assert!(text(&refused.stderr).contains("CREDENTIALS_REVOKED"));
}
