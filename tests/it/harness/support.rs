//! What tests share beside the server: waiting on a condition, wire values, error checks,
//! free ports and the tools scripts/test prepares.

use std::time::Duration;

use leasehold::proto as pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::TestServer;

/// Binds `address`, retrying briefly while a just-stopped server's socket lingers.
pub(super) async fn bind(address: std::net::SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..50 {
        if let Ok(listener) = tokio::net::TcpListener::bind(address).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot bind {address}");
}

/// The Python that scripts/test prepares (kubernetes-validate, grpcio, grpcurl).
pub fn python() -> std::path::PathBuf {
    std::env::var_os("LEASEHOLD_PYTHON")
        .expect("LEASEHOLD_PYTHON names the Python scripts/test sets up under target/python")
        .into()
}

/// A program installed beside that Python (its virtual environment's `bin`).
pub fn python_tool(name: &str) -> std::path::PathBuf {
    python().with_file_name(name)
}

/// How long a test waits for a condition that should come to hold: generous for a loaded CI
/// machine, while a real failure still shows within seconds.
pub const EVENTUALLY: Duration = Duration::from_secs(15);

/// Asks `probe` every 20 ms until it answers `Some`, for at most `within`; panics naming `what`
/// otherwise. Tests wait with this, never with a bare sleep, for a state they expect.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} in vain until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a plain condition.
pub async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    eventually(what, EVENTUALLY, async || condition().then_some(())).await
}

/// Polls the task until `done` holds and returns it.
pub async fn wait_for_task(
    server: &TestServer,
    task_id: &str,
    done: impl Fn(&pb::Task) -> bool,
) -> pb::Task {
    let what = format!("task {task_id} reaches the expected state");
    eventually(&what, EVENTUALLY, async || {
        let task = server.get_task(task_id).await;
        done(&task).then_some(task)
    })
    .await
}

pub async fn wait_for_status(
    server: &TestServer,
    task_id: &str,
    status: pb::TaskStatus,
) -> pb::Task {
    wait_for_task(server, task_id, |task| status_of(task) == status).await
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A wire duration of `millis` milliseconds.
pub fn wire_millis(millis: u64) -> prost_types::Duration {
    prost_types::Duration::try_from(Duration::from_millis(millis)).unwrap()
}

pub fn task_in(queue: &str) -> pb::EnqueueTaskRequest {
    pb::EnqueueTaskRequest {
        queue: queue.into(),
        payload: b"payload".to_vec(),
        ..Default::default()
    }
}

pub fn task_id(claimed: &pb::ClaimedTask) -> &str {
    &claimed.task.as_ref().unwrap().id
}

pub fn status_of(task: &pb::Task) -> pb::TaskStatus {
    pb::TaskStatus::try_from(task.status).unwrap()
}

/// Asserts a status carries `code` and an ErrorInfo with `reason` in leasehold's domain.
#[track_caller]
pub fn assert_error(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "unexpected code in {status:?}");
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "unexpected reason in {status:?}");
    assert_eq!(info.domain, "leasehold.v1");
}

/// The ErrorInfo metadata value under `key`.
pub fn error_metadata(status: &Status, key: &str) -> Option<String> {
    status.get_details_error_info()?.metadata.get(key).cloned()
}
