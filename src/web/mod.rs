//! The server's HTTP side: Prometheus text on `/metrics`, served on `--metrics-listen`.
//! Plain HTTP/1.1 without TLS or tokens, like the metrics endpoints scrapers expect; bind it
//! to a private address.

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
