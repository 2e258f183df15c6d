//! The service's error categories. Stores and the coordinator produce these; the gRPC layer
//! maps each to exactly one status code and ErrorInfo reason (`grpc/status.rs`).

use chrono::{DateTime, Utc};

use super::auth::CredentialProblem;
use super::fence::Refusal;
use super::ids::{RuntimeId, TaskId};
use super::task::{Task, TaskStatus};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {description}")]
    InvalidField { field: String, description: String },
    #[error("claim_token is missing or is not a UUID")]
    MalformedClaimToken,
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    #[error("runtime {0} not found")]
    RuntimeNotFound(RuntimeId),
    #[error("{}", refused_message(.0))]
    Refused(Box<RefusedWrite>),
    #[error("the task store is unavailable")]
    StoreUnavailable(#[source] BoxError),
    /// A serialization failure or deadlock that the server's own retries did not resolve.
    #[error("the change conflicted with a concurrent one; retry it")]
    StoreConflict(#[source] BoxError),
    #[error("the request's deadline passed before the claim committed")]
    DeadlineExceeded,
    #[error("the server is shutting down; reconnect to another replica")]
    Draining,
    #[error("only a FAILED or CANCELLED task can be retried (task {task_id}, status {})", .status.as_str())]
    NotRetryable { task_id: TaskId, status: TaskStatus },
    #[error("{}", credential_message(*.0))]
    Unauthenticated(CredentialProblem),
    #[error("this credential lacks the {0} scope for this call")]
    ScopeMissing(String),
    #[error("this runtime's credential cannot act for another runtime or on its tasks")]
    RuntimeMismatch,
    #[error("API key {0} not found")]
    ApiKeyNotFound(uuid::Uuid),
    #[error("this runtime already has {0} claim streams open here, the most allowed")]
    TooManyStreams(usize),
    #[error("the server is at its limit of calls in progress; retry shortly")]
    Overloaded,
    #[error("internal error")]
    Internal(#[source] BoxError),
}

/// An owner write the fence refused, with the task facts a client needs to react.
#[derive(Debug, Clone, PartialEq)]
pub struct RefusedWrite {
    pub refusal: Refusal,
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidField {
            field: field.into(),
            description: description.into(),
        }
    }

    pub fn refused(refusal: Refusal, task: &Task) -> Self {
        Error::Refused(Box::new(RefusedWrite {
            refusal,
            task_id: task.id,
            status: task.status,
            lease_expires_at: task.lease_expires_at,
        }))
    }
}

fn credential_message(problem: CredentialProblem) -> &'static str {
    match problem {
        CredentialProblem::Missing => {
            "no credential: send `authorization: Bearer <token>` (an API key, a runtime token or the admin token)"
        }
        CredentialProblem::Invalid => "the credential is malformed or unknown",
        CredentialProblem::Expired => "the API key has expired",
        CredentialProblem::Revoked => {
            "the credential was revoked (a runtime token is revoked when its name registers again)"
        }
    }
}

fn refused_message(refused: &RefusedWrite) -> String {
    let what = match refused.refusal {
        Refusal::ClaimSuperseded => "the claim token is not the task's current claim",
        Refusal::StartedByAnotherClaim => "the task is already running under another claim",
        Refusal::LeaseExpired => "the claim's lease has expired",
        Refusal::TaskNotStarted => "the task has not been started",
        Refusal::TaskAlreadyStarted => "the task is running; only a dispatched task has a lease",
        Refusal::TaskCancelled => "the task was cancelled",
        Refusal::TaskTerminal => "the task has already finished",
    };
    format!(
        "{what} (task {}, status {})",
        refused.task_id,
        refused.status.as_str()
    )
}
