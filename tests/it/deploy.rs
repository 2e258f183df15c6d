//! The Kubernetes manifests (deploy/kubernetes/) against the Kubernetes schemas, offline, and
//! against a running server: the health services the probes ask for answer as they should.

use std::process::Command;

use serde_json::Value;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{Backend, TestServer};

/// Runs deploy/kubernetes/check.py (schemas, ports, grace) and returns what it printed.
fn checked_manifests() -> Value {
    let python = crate::harness::python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/check.py");
    let output = Command::new(python).arg(script).output().unwrap();
    assert!(
        output.status.success(),
        "the manifests do not pass: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn health(server: &TestServer, service: &str) -> ServingStatus {
    let response = HealthClient::new(server.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    response.status()
}

#[tokio::test]
async fn the_manifests_are_valid_and_their_probes_match_the_server() {
    let manifests = checked_manifests();
    assert_eq!(manifests["listen_port"], 50051);
    let default_listen = leasehold::config::Config::defaults().listen.port();
    assert_eq!(manifests["listen_port"], default_listen);
    let readiness = manifests["readiness_service"].as_str().unwrap();
    let liveness = manifests["liveness_service"].as_str().unwrap();

    let mut server = Backend::Memory.start().await;
    assert_eq!(health(&server, readiness).await, ServingStatus::Serving);
    assert_eq!(health(&server, liveness).await, ServingStatus::Serving);

    // A drain takes the pod out of rotation without getting it restarted. (Watched: the
    // listener closes soon after, so a fresh Check could not connect.)
    let mut readiness_watch = watch(&server, readiness).await;
    let mut liveness_watch = watch(&server, liveness).await;
    server.begin_shutdown();
    let readiness_updates = statuses_until_closed(&mut readiness_watch).await;
    let liveness_updates = statuses_until_closed(&mut liveness_watch).await;
    assert!(
        readiness_updates.contains(&ServingStatus::NotServing),
        "{readiness_updates:?}"
    );
    assert!(
        !liveness_updates.contains(&ServingStatus::NotServing),
        "{liveness_updates:?}"
    );
}

async fn watch(
    server: &TestServer,
    service: &str,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    HealthClient::new(server.channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The statuses a watch reports until the server ends it (at most two seconds).
async fn statuses_until_closed(
    watch: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Vec<ServingStatus> {
    let mut statuses = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while let Ok(Ok(Some(update))) = tokio::time::timeout_at(deadline, watch.message()).await {
        statuses.push(update.status());
    }
    statuses
}
