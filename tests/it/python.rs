//! The Python client (clients/python/): its stubs match proto/, and its worker and producer
//! work end to end against a real server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use leasehold::proto as pb;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::process::Command;

use crate::harness::{TestServer, python, status_of};

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

fn generated_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(root.join("leasehold/v1"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn the_committed_stubs_are_what_generate_sh_makes_from_proto() {
    let fresh = std::env::temp_dir().join(format!("leasehold-stubs-{}", uuid::Uuid::new_v4()));
    let generated = std::process::Command::new(client_dir().join("generate.sh"))
        .arg(&fresh)
        .env("PYTHON", python())
        .output()
        .unwrap();
    assert!(
        generated.status.success(),
        "{}",
        String::from_utf8_lossy(&generated.stderr)
    );
    let (committed, fresh_files) = (generated_files(&client_dir()), generated_files(&fresh));
    let _ = std::fs::remove_dir_all(&fresh);
    let names: Vec<&str> = committed.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.len(), 12, "{names:?}");
    assert!(
        committed == fresh_files,
        "clients/python stubs are stale: run clients/python/generate.sh"
    );
}

#[sqlx::test]
async fn the_python_worker_processes_what_python_enqueued(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    python_end_to_end(&server, None).await;
}

/// The same with `--auth token`: the client takes the admin token from `LEASEHOLD_TOKEN`, and
/// the worker switches to the runtime token its registration returned.
#[sqlx::test]
async fn the_python_client_carries_credentials(pool: PgPoolOptions, connect: PgConnectOptions) {
    let admin = "python-admin-token";
    let file = crate::auth::admin_token_file(admin);
    let server = TestServer::start_with(pool, connect, crate::auth::with_tokens(file)).await;
    python_end_to_end(&server, Some(admin)).await;
}

async fn python_end_to_end(server: &TestServer, token: Option<&str>) {
    let mut command = Command::new(python());
    command
        .arg(client_dir().join("tests/end_to_end.py"))
        .arg(server.address.to_string())
        .env_remove("LEASEHOLD_TOKEN");
    if let Some(token) = token {
        command.env("LEASEHOLD_TOKEN", token);
    }
    let output = command.output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["superseded_reason"], "CLAIM_SUPERSEDED");
    if token.is_some() {
        // The script checked every outcome itself; the harness's own clients carry no token.
        return;
    }
    for id in seen["completed"].as_array().unwrap() {
        let task = server.get_task(id.as_str().unwrap()).await;
        assert_eq!(status_of(&task), pb::TaskStatus::Completed);
        assert_eq!(task.result, task.payload.to_ascii_uppercase());
    }
    let rejected = server.get_task(seen["failed"][0].as_str().unwrap()).await;
    assert_eq!(
        (status_of(&rejected), rejected.attempt),
        (pb::TaskStatus::Failed, 1)
    );
    let contested = server.get_task(seen["contested"].as_str().unwrap()).await;
    assert_eq!(status_of(&contested), pb::TaskStatus::Completed);
}

#[sqlx::test]
async fn the_python_examples_work_together(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = TestServer::start(pool, connect).await;
    let address = server.address.to_string();
    let examples = client_dir().join("examples");
    let mut worker = Command::new(python())
        .arg(examples.join("worker.py"))
        .args(["--server", &address, "--queue", "examples", "--tasks", "2"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let produced = Command::new(python())
        .arg(examples.join("producer.py"))
        .args([
            "--server", &address, "--queue", "examples", "hello", "world",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        produced.status.success(),
        "{}",
        String::from_utf8_lossy(&produced.stderr)
    );
    let printed = String::from_utf8_lossy(&produced.stdout);
    assert!(printed.contains("TASK_STATUS_COMPLETED HELLO"), "{printed}");
    assert!(printed.contains("TASK_STATUS_COMPLETED WORLD"), "{printed}");
    let finished = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        finished.success(),
        "the worker example stops after --tasks 2"
    );
}
