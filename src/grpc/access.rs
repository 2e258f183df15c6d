//! Authentication and authorization at the gRPC boundary (spec §9), in one place.
//!
//! [`AuthLayer`] resolves every call's bearer token to a [`Principal`] (through the
//! coordinator's credential cache) and checks the scope the RPC needs ([`requirement`], one
//! line per RPC). Checks that need the request's content — the queue a scope's glob must
//! match, the runtime a runtime token must be — are the handlers' one-line calls to
//! [`queue`] and [`runtime`] below. Health and reflection need no credential.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use crate::coordinator::Coordinator;
use crate::domain::auth::{CredentialProblem, Principal, Scope};
use crate::domain::{Error, Result, RuntimeId, TaskId};

/// What an RPC needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Requirement {
    /// Health and reflection.
    Public,
    /// This scope, whatever the request says.
    Scope(Scope),
    /// This scope for the queue(s) the request names; the handler checks them.
    Queues(Scope),
    /// A runtime token (the handler checks it is the request's runtime) or `admin`.
    Runtime,
}

/// One line per RPC. Anything not listed (key management, unknown methods) needs `admin`.
pub(super) fn requirement(path: &str) -> Requirement {
    use Requirement::{Public, Queues, Runtime};
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or_default();
    match (service, method) {
        ("grpc.health.v1.Health", _) => Public,
        (service, _) if service.starts_with("grpc.reflection.") => Public,
        ("leasehold.v1.WorkerService", "RegisterRuntime") => Queues(Scope::Register),
        ("leasehold.v1.WorkerService", _) => Runtime,
        ("leasehold.v1.TaskService", "EnqueueTask" | "EnqueueTasks") => Queues(Scope::Enqueue),
        ("leasehold.v1.TaskService", "GetTask" | "ListTasks") => Queues(Scope::Read),
        ("leasehold.v1.TaskService", "CancelTask" | "CancelTasks") => Queues(Scope::Manage),
        ("leasehold.v1.AdminService", "ListRuntimes") => Requirement::Scope(Scope::Read),
        ("leasehold.v1.AdminService", "DescribeQueue") => Queues(Scope::Read),
        ("leasehold.v1.AdminService", "UpdateQueue" | "RetryTask" | "RetryTasks") => {
            Queues(Scope::Manage)
        }
        _ => Requirement::Scope(Scope::Admin),
    }
}

/// The check the layer can make before the request is read.
fn admit(principal: &Principal, requirement: Requirement) -> Result<()> {
    let admitted = match requirement {
        Requirement::Public => true,
        Requirement::Scope(scope) => principal.has(scope, None),
        Requirement::Queues(scope) => principal.has_any(scope),
        Requirement::Runtime => {
            matches!(principal, Principal::Runtime(_)) || principal.has(Scope::Admin, None)
        }
    };
    if admitted {
        return Ok(());
    }
    let scope = match requirement {
        Requirement::Scope(scope) | Requirement::Queues(scope) => scope,
        Requirement::Public | Requirement::Runtime => Scope::Admin,
    };
    Err(Error::ScopeMissing(scope.as_str().to_owned()))
}

/// The caller, as the layer resolved it.
pub(super) fn principal<T>(request: &tonic::Request<T>) -> Result<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or(Error::Unauthenticated(CredentialProblem::Missing))
}

/// The bearer token a call carried, for a stream that checks it again later.
pub(super) fn bearer_of<T>(request: &tonic::Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    bearer_token(value).map(str::to_owned)
}

/// The caller holds `scope` for `queue`.
pub(super) fn queue(principal: &Principal, scope: Scope, queue: &str) -> Result<()> {
    if principal.has(scope, Some(queue)) {
        Ok(())
    } else {
        Err(Error::ScopeMissing(format!("{}:{queue}", scope.as_str())))
    }
}

/// For a call about one task: a key whose scope is limited to some queues may touch only
/// tasks of those queues (one read to learn the task's queue, for such keys only).
pub(super) async fn task_queue(
    coordinator: &Coordinator,
    principal: &Principal,
    scope: Scope,
    task_id: TaskId,
) -> Result<()> {
    if principal.has(scope, None) {
        return Ok(());
    }
    let task = coordinator.get_task(task_id).await?;
    queue(principal, scope, &task.queue)
}

/// The caller may act as `runtime`: it is that runtime, or holds `admin`.
pub(super) fn runtime(principal: &Principal, runtime: RuntimeId) -> Result<()> {
    if principal.may_act_as(runtime) {
        Ok(())
    } else {
        Err(Error::RuntimeMismatch)
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    coordinator: Arc<Coordinator>,
}

impl AuthLayer {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            coordinator: self.coordinator.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    coordinator: Arc<Coordinator>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, ResBody> Service<Request<B>> for Authenticate<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let requirement = requirement(request.uri().path());
        // The clone is the one made ready for the next call; this call takes the ready one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if requirement == Requirement::Public {
            return Box::pin(inner.call(request));
        }
        let coordinator = self.coordinator.clone();
        let token = bearer(request.headers()).map(str::to_owned);
        Box::pin(async move {
            let admitted = async {
                let principal = coordinator.authenticate(token.as_deref()).await?;
                admit(&principal, requirement)?;
                Ok::<_, Error>(principal)
            };
            match admitted.await {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(error) => {
                    // The error names no secret: only which check failed.
                    tracing::info!(%error, path = request.uri().path(), "call refused");
                    Ok(Status::from(error).into_http())
                }
            }
        })
    }
}

/// The token of an `authorization: Bearer <token>` header (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    bearer_token(headers.get(http::header::AUTHORIZATION)?.to_str().ok()?)
}

/// `Bearer <token>` → the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_leasehold_rpc_states_its_need() {
        assert_eq!(
            requirement("/grpc.health.v1.Health/Check"),
            Requirement::Public
        );
        assert_eq!(
            requirement("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Requirement::Public
        );
        assert_eq!(
            requirement("/leasehold.v1.WorkerService/ClaimTask"),
            Requirement::Runtime
        );
        assert_eq!(
            requirement("/leasehold.v1.TaskService/EnqueueTask"),
            Requirement::Queues(Scope::Enqueue)
        );
        assert_eq!(
            requirement("/leasehold.v1.AdminService/CreateApiKey"),
            Requirement::Scope(Scope::Admin)
        );
        assert_eq!(
            requirement("/leasehold.v1.Unknown/Method"),
            Requirement::Scope(Scope::Admin)
        );
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some("abc"));
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
