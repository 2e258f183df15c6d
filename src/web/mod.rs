//! The server's HTTP side: Prometheus text on `/metrics` (on `--metrics-listen`, and on
//! `--http-listen` beside the operator console). Plain HTTP/1.1: `/metrics` asks for no
//! credential, as scrapers expect (bind it to a private address); the console signs its
//! visitors in (docs/console.md). For HTTPS, put a TLS-terminating proxy in front.

pub mod console;

use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metrics::Metrics;

/// `GET /metrics`: every series of `metrics`.
pub fn metrics_routes(metrics: Metrics) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics.render(),
                )
            }
        }),
    )
}

/// Serves `routes` on `listener` until `stopping` is cancelled.
pub fn spawn(listener: TcpListener, routes: Router, stopping: CancellationToken) {
    tokio::spawn(async move {
        let served = axum::serve(listener, routes)
            .with_graceful_shutdown(stopping.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::warn!(%error, "the HTTP listener failed");
        }
    });
}
