//! Prometheus metrics on `--metrics-listen`, scraped over real HTTP during lease cycles.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Backend, TestServer};

pub async fn scrape(address: &str) -> String {
    let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
    connection
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: leasehold\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    connection.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the sample whose line starts with `series` (name and labels as printed).
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn lease_cycle(server: &TestServer, runtime: &str) {
    server.enqueue_to("q").await;
    let claimed = server.claim_one(runtime).await;
    server.start_task(&claimed).await.unwrap();
    server.complete(&claimed, b"done").await.unwrap();
    // Stale writes, for the rejection counters.
    server.start_task(&claimed).await.unwrap_err();
    server.fail(&claimed, true).await.unwrap_err();
}

async fn counters_move_during_lease_cycles(backend: Backend) {
    let port = crate::harness::free_port();
    let address = format!("127.0.0.1:{port}");
    let server = backend
        .start_with(|config| config.metrics_listen = Some(address.parse().unwrap()))
        .await;
    let runtime = server.register("measured", &["q"]).await;
    lease_cycle(&server, &runtime).await;
    // The exporter starts listening in the background.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = scrape(&address).await;

    lease_cycle(&server, &runtime).await;
    lease_cycle(&server, &runtime).await;
    let second = scrape(&address).await;

    let completions = "leasehold_task_completions_total";
    assert_eq!(
        sample(&second, completions) - sample(&first, completions),
        2.0
    );
    let claims = r#"leasehold_rpc_requests_total{method="WorkerService/ClaimTask",code="OK"}"#;
    assert_eq!(
        sample(&second, claims) - sample(&first, claims),
        2.0,
        "{second}"
    );
    let from_store = r#"leasehold_claim_calls_total{answered_by="store"}"#;
    assert_eq!(
        sample(&second, from_store) - sample(&first, from_store),
        2.0,
        "{second}"
    );
    let rejected = r#"leasehold_rpc_requests_total{method="WorkerService/StartTask",code="FAILED_PRECONDITION"}"#;
    assert_eq!(sample(&second, rejected), 3.0, "{second}");
    let stale = r#"leasehold_stale_token_rejections_total{reason="TASK_TERMINAL"}"#;
    assert_eq!(sample(&second, stale), 6.0, "{second}");
    assert!(second.contains("leasehold_rpc_duration_seconds_bucket"));
    assert!(second.contains(
        r#"leasehold_store_call_duration_seconds_count{operation="claim",outcome="ok"}"#
    ));
}

conformance!(counters_move_during_lease_cycles);
