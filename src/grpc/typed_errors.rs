//! Every error answer carries an ErrorInfo (spec §4, §10). The handlers' errors do; the ones
//! tonic makes before a handler runs do not: a request that is not a valid message of its RPC
//! (INTERNAL, as gRPC's own table says for parse errors, which clients treat as final) or one
//! over the size limit (OUT_OF_RANGE). This layer gives them the `INVALID_ARGUMENT` /
//! `INVALID_FIELD` they deserve; any other bare error keeps its code and gets its name as
//! reason.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::domain::Error;

#[derive(Clone, Copy, Debug, Default)]
pub struct TypedErrorsLayer;

impl<S> Layer<S> for TypedErrorsLayer {
    type Service = TypedErrors<S>;

    fn layer(&self, inner: S) -> TypedErrors<S> {
        TypedErrors { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TypedErrors<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for TypedErrors<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match untyped_error(response.headers()) {
                Some(status) => typed(status).into_http(),
                None => response,
            })
        })
    }
}

/// The status of a trailers-only error answer without error details.
fn untyped_error(headers: &HeaderMap) -> Option<Status> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    if code == 0 || headers.contains_key("grpc-status-details-bin") {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|message| message.to_str().ok())
        .unwrap_or_default();
    Some(Status::new(Code::from_i32(code), message))
}

fn typed(status: Status) -> Status {
    match status.code() {
        Code::Internal | Code::OutOfRange => Status::from(Error::invalid(
            "request",
            "is not a valid message of this RPC, or is larger than the server accepts",
        )),
        code => {
            let reason = format!("{code:?}").to_uppercase();
            let details = tonic_types::ErrorDetails::with_error_info(
                reason,
                super::status::DOMAIN,
                std::collections::HashMap::new(),
            );
            use tonic_types::StatusExt as _;
            Status::with_error_details(code, status.message().to_owned(), details)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_decode_errors_become_invalid_field() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", "13".parse().unwrap());
        headers.insert("grpc-message", "invalid wire type".parse().unwrap());
        let status = typed(untyped_error(&headers).unwrap());
        assert_eq!(status.code(), Code::InvalidArgument);
        headers.insert("grpc-status-details-bin", "AA".parse().unwrap());
        assert!(
            untyped_error(&headers).is_none(),
            "a typed error is left alone"
        );
    }
}
