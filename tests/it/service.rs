//! Health, reflection and shutdown, as Kubernetes probes and grpcurl see them.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::{v1, v1alpha};

use crate::harness::TestServer;

const LEASEHOLD_SERVICES: [&str; 3] = [
    "leasehold.v1.WorkerService",
    "leasehold.v1.TaskService",
    "leasehold.v1.AdminService",
];

#[sqlx::test]
async fn health_is_serving_and_turns_not_serving_when_shutdown_begins(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let mut server = TestServer::start(pool, connect).await;
    let mut health = HealthClient::new(server.channel.clone());
    for service in std::iter::once("").chain(LEASEHOLD_SERVICES) {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first: HealthCheckResponse = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    server.begin_shutdown();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a health update after shutdown began")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
}

#[sqlx::test]
async fn shutdown_completes_within_the_grace_period(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let stopped = tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await;
    stopped.expect("stopped in time").expect("clean stop");
}

#[sqlx::test]
async fn reflection_v1alpha_lists_every_service_for_grpcurl(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use v1alpha::server_reflection_client::ServerReflectionClient;
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;

    let server = TestServer::start(pool, connect).await;
    let mut client = ServerReflectionClient::new(server.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in LEASEHOLD_SERVICES
        .into_iter()
        .chain(["grpc.health.v1.Health"])
    {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} in {names:?}"
        );
    }
}

#[sqlx::test]
async fn reflection_v1_describes_the_worker_service(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    use v1::server_reflection_client::ServerReflectionClient;
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;

    let server = TestServer::start(pool, connect).await;
    let mut client = ServerReflectionClient::new(server.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "leasehold.v1.WorkerService".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("unexpected reflection answer");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}
