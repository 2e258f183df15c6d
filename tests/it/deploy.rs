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

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(continued) => current.push_str(continued),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

fn manifest_value(key: &str) -> String {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    manifest
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once('=')?;
            (name.trim() == key).then(|| value.trim().trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in Cargo.toml"))
}

/// Without a Docker daemon here, the image is checked statically: every build-context file
/// it copies exists and is not excluded by .dockerignore, the build stage runs the crate's
/// `rust-version` and builds from the lockfile, and every target path Cargo.toml names exists
/// in the dependency stage (cargo refuses a manifest whose targets are missing).
#[test]
fn the_dockerfile_copies_what_exists_and_builds_locked_with_the_declared_toolchain() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let instructions = dockerfile_instructions();
    let ignored = std::fs::read_to_string(root.join(".dockerignore")).unwrap_or_default();
    let mut copied = Vec::new();
    for instruction in &instructions {
        let Some(arguments) = instruction.strip_prefix("COPY ") else {
            continue;
        };
        if arguments.starts_with("--from=") {
            continue;
        }
        let parts: Vec<&str> = arguments.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                root.join(source).exists(),
                "COPY {source}: no such file in the context"
            );
            assert!(
                !ignored.lines().any(|pattern| pattern.trim() == *source),
                "COPY {source}: excluded by .dockerignore"
            );
            copied.push((*source).to_owned());
        }
    }
    assert!(copied.iter().any(|source| source == "Cargo.lock"));

    let rust_version = manifest_value("rust-version");
    let build_from = instructions
        .iter()
        .find(|instruction| instruction.starts_with("FROM rust:"))
        .expect("a rust build stage");
    assert!(
        build_from.starts_with(&format!("FROM rust:{rust_version}-")),
        "{build_from} is not rust-version {rust_version}"
    );
    let builds: Vec<&String> = instructions
        .iter()
        .filter(|instruction| instruction.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty());
    for build in &builds {
        assert!(
            build.contains("--locked"),
            "{build} does not use the lockfile"
        );
    }

    // The test target's path must be there when the dependency stage first runs cargo.
    let test_path = manifest_value("path");
    let first_build = builds[0];
    assert!(
        copied
            .iter()
            .any(|source| test_path.starts_with(source.as_str()))
            || first_build.contains(&test_path),
        "{test_path} is missing when the dependency stage runs cargo"
    );
}
