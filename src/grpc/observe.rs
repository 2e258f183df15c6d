//! Every RPC, observed in one place (a tower layer in front of all services): a tracing span
//! named `rpc` carrying the method (handlers record `task_id` and `runtime_id` into it as
//! they parse them), and the request count and latency by method and status code.
//!
//! The code is read from the response headers: tonic answers every error as a trailers-only
//! response, whose `grpc-status` travels in the headers; a success carries it in the trailers
//! only, so no header means OK. For a stream, the figures describe its opening. A refusal's
//! `ErrorInfo` reason also counts it as an auth denial, a shed call or a stale token.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, Request, Response};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;

use crate::telemetry::metrics::Metrics;

/// The fence's refusals of a superseded claim's owner write (spec §3).
const STALE_TOKEN_REASONS: [&str; 6] = [
    "CLAIM_SUPERSEDED",
    "LEASE_EXPIRED",
    "TASK_NOT_STARTED",
    "TASK_ALREADY_STARTED",
    "TASK_CANCELLED",
    "TASK_TERMINAL",
];

/// Counts a refused call by its `ErrorInfo` reason: an auth denial (UNAUTHENTICATED,
/// PERMISSION_DENIED), a shed call (OVERLOADED) or a stale token. The reasons are the server's
/// own, so the label values stay few.
pub(super) fn count_refusal(metrics: &Metrics, status: &Status) {
    let Some(reason) = status.get_details_error_info().map(|info| info.reason) else {
        return;
    };
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => metrics.auth_denied(&reason),
        Code::ResourceExhausted if reason == "OVERLOADED" => metrics.call_shed(),
        _ if STALE_TOKEN_REASONS.contains(&reason.as_str()) => {
            metrics.stale_token_rejected(&reason)
        }
        _ => {}
    }
}

/// Observes every call into the server's `metrics`.
#[derive(Clone, Debug)]
pub struct ObserveLayer {
    metrics: Metrics,
}

impl ObserveLayer {
    pub fn new(metrics: Metrics) -> ObserveLayer {
        ObserveLayer { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Observe<S> {
    inner: S,
    metrics: Metrics,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let span =
            tracing::info_span!("rpc", method = %method, task_id = Empty, runtime_id = Empty);
        let started = Instant::now();
        let response = span.in_scope(|| self.inner.call(request));
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                let result = response.await;
                let code = match &result {
                    Ok(response) => code_name(response.headers()),
                    Err(_) => "UNKNOWN",
                };
                metrics.rpc_answered(method, code, started.elapsed());
                if let Ok(response) = &result
                    && code != "OK"
                    && let Some(status) = Status::from_header_map(response.headers())
                {
                    count_refusal(&metrics, &status);
                }
                result
            }
            .instrument(span),
        )
    }
}

/// `/leasehold.v1.WorkerService/ClaimTask` → `WorkerService/ClaimTask`; a path the server
/// does not serve → `unknown`, so made-up paths cannot grow the metric series (spec §10).
fn method_label(path: &str) -> String {
    let label = path
        .trim_start_matches('/')
        .split_once('/')
        .map(|(service, method)| {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        });
    match label {
        Some(label) if served_methods().contains(label.as_str()) => label,
        _ => "unknown".to_owned(),
    }
}

/// Every `Service/Method` the server serves: leasehold's, from its own descriptors (so a new
/// RPC is known without a list to keep), and health's and reflection's.
fn served_methods() -> &'static std::collections::HashSet<String> {
    static SERVED: std::sync::LazyLock<std::collections::HashSet<String>> =
        std::sync::LazyLock::new(|| {
            use prost::Message as _;
            let mut served: std::collections::HashSet<String> = [
                "Health/Check",
                "Health/Watch",
                "ServerReflection/ServerReflectionInfo",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect();
            if let Ok(files) =
                prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
            {
                for service in files.file.iter().flat_map(|file| &file.service) {
                    for method in &service.method {
                        served.insert(format!("{}/{}", service.name(), method.name()));
                    }
                }
            }
            served
        });
    &SERVED
}

/// The canonical name of the `grpc-status` in `headers` (absent = OK).
fn code_name(headers: &HeaderMap) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let Some(status) = headers.get("grpc-status") else {
        return "OK";
    };
    status
        .to_str()
        .ok()
        .and_then(|status| status.parse::<usize>().ok())
        .and_then(|status| NAMES.get(status).copied())
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_labelled_by_service_and_rpc() {
        assert_eq!(
            method_label("/leasehold.v1.WorkerService/ClaimTask"),
            "WorkerService/ClaimTask"
        );
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(
            method_label("/leasehold.v1.AdminService/CreateApiKey"),
            "AdminService/CreateApiKey"
        );
    }

    #[test]
    fn paths_the_server_does_not_serve_are_one_label() {
        assert_eq!(method_label("/leasehold.v1.WorkerService/Nope"), "unknown");
        assert_eq!(method_label("/made.up.Service/X1"), "unknown");
        assert_eq!(method_label("/"), "unknown");
    }

    #[test]
    fn codes_come_from_the_grpc_status_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(code_name(&headers), "OK");
        headers.insert("grpc-status", "9".parse().unwrap());
        assert_eq!(code_name(&headers), "FAILED_PRECONDITION");
    }
}
