//! The only place a `tonic::Code` and an ErrorInfo reason are chosen (spec §4).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{Error, Refusal, RefusedWrite};

use super::convert::{task_status_name, timestamp_text};

pub const DOMAIN: &str = "leasehold.v1";

/// What an OVERLOADED answer suggests waiting (google.rpc.RetryInfo) before trying again.
const OVERLOADED_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        // Messages may quote what a client sent; an error travels in HTTP/2 headers, which a
        // peer refuses past a few KiB, so what a client sent can never make it unsendable.
        let message = bounded(error.to_string());
        match error {
            Error::InvalidField { field, description } => {
                let (field, description) = (bounded(field), bounded(description));
                let mut details = error_info("INVALID_FIELD", [("field", field.clone())]);
                details.add_bad_request_violation(field, description);
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::MalformedClaimToken => {
                let mut details =
                    error_info("MALFORMED_CLAIM_TOKEN", [("field", "claim_token".into())]);
                details.add_bad_request_violation("claim_token", "must be the UUID from the claim");
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::TaskNotFound(task_id) => Status::with_error_details(
                Code::NotFound,
                message,
                error_info("TASK_NOT_FOUND", [("task_id", task_id.to_string())]),
            ),
            Error::RuntimeNotFound(runtime_id) => Status::with_error_details(
                Code::NotFound,
                message,
                error_info(
                    "RUNTIME_NOT_FOUND",
                    [("runtime_id", runtime_id.to_string())],
                ),
            ),
            Error::Refused(refused) => refused_status(&refused, message),
            Error::StoreUnavailable(_) => Status::with_error_details(
                Code::Unavailable,
                "the task store is unavailable; retry with backoff",
                error_info("STORE_UNAVAILABLE", []),
            ),
            Error::StoreConflict(_) => {
                Status::with_error_details(Code::Aborted, message, error_info("STORE_CONFLICT", []))
            }
            Error::DeadlineExceeded => Status::with_error_details(
                Code::DeadlineExceeded,
                message,
                error_info("DEADLINE_EXCEEDED", []),
            ),
            Error::NotRetryable { task_id, status } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                error_info(
                    "TASK_NOT_RETRYABLE",
                    [
                        ("task_id", task_id.to_string()),
                        ("status", task_status_name(status).to_owned()),
                    ],
                ),
            ),
            Error::Draining => Status::with_error_details(
                Code::Unavailable,
                message,
                error_info("SERVER_DRAINING", []),
            ),
            Error::Unauthenticated(problem) => Status::with_error_details(
                Code::Unauthenticated,
                message,
                error_info(problem.reason(), []),
            ),
            Error::ScopeMissing(scope) => Status::with_error_details(
                Code::PermissionDenied,
                message,
                error_info("SCOPE_MISSING", [("scope", scope)]),
            ),
            Error::RuntimeMismatch => Status::with_error_details(
                Code::PermissionDenied,
                message,
                error_info("RUNTIME_MISMATCH", []),
            ),
            Error::TooManyStreams(limit) => Status::with_error_details(
                Code::ResourceExhausted,
                message,
                error_info("TOO_MANY_STREAMS", [("limit", limit.to_string())]),
            ),
            Error::Overloaded => {
                let mut details = error_info("OVERLOADED", []);
                details.set_retry_info(Some(OVERLOADED_RETRY_AFTER));
                Status::with_error_details(Code::ResourceExhausted, message, details)
            }
            Error::ApiKeyNotFound(key_id) => Status::with_error_details(
                Code::NotFound,
                message,
                error_info("API_KEY_NOT_FOUND", [("key_id", key_id.to_string())]),
            ),
            // The source (driver text, SQL) was logged where it arose; the client gets nothing
            // of it.
            Error::Internal(_) => Status::with_error_details(
                Code::Internal,
                "internal error",
                error_info("INTERNAL", []),
            ),
        }
    }
}

/// The most of a text an error carries.
const MAX_ERROR_TEXT_BYTES: usize = 1024;

fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT_BYTES {
        let mut end = MAX_ERROR_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

fn refused_status(refused: &RefusedWrite, message: String) -> Status {
    let (code, reason) = match refused.refusal {
        Refusal::ClaimSuperseded => (Code::FailedPrecondition, "CLAIM_SUPERSEDED"),
        Refusal::StartedByAnotherClaim => (Code::AlreadyExists, "CLAIM_SUPERSEDED"),
        Refusal::LeaseExpired => (Code::FailedPrecondition, "LEASE_EXPIRED"),
        Refusal::TaskNotStarted => (Code::FailedPrecondition, "TASK_NOT_STARTED"),
        Refusal::TaskAlreadyStarted => (Code::FailedPrecondition, "TASK_ALREADY_STARTED"),
        Refusal::TaskCancelled => (Code::FailedPrecondition, "TASK_CANCELLED"),
        Refusal::TaskTerminal => (Code::FailedPrecondition, "TASK_TERMINAL"),
    };
    let mut metadata = vec![
        ("task_id", refused.task_id.to_string()),
        ("status", task_status_name(refused.status).to_owned()),
    ];
    if let Some(expires_at) = refused.lease_expires_at {
        metadata.push(("lease_expires_at", timestamp_text(expires_at)));
    }
    Status::with_error_details(code, message, error_info(reason, metadata))
}

fn error_info(
    reason: &str,
    metadata: impl IntoIterator<Item = (&'static str, String)>,
) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    ErrorDetails::with_error_info(reason, DOMAIN, metadata)
}

/// The tonic status a `google.rpc.Status` reported inside a response stands for: its code,
/// message and details, as if the call itself had failed with it (the inverse of
/// [`rpc_status`]).
pub fn status_from_rpc(status: tonic_types::pb::Status) -> Status {
    use prost::Message as _;
    let details = status.encode_to_vec();
    Status::with_details(Code::from_i32(status.code), status.message, details.into())
}

/// The `google.rpc.Status` a tonic status carries on the wire (code, message and the error
/// details), for errors reported inside a response, such as one item of EnqueueTasks.
pub fn rpc_status(status: Status) -> tonic_types::pb::Status {
    use prost::Message as _;
    tonic_types::pb::Status::decode(status.details()).unwrap_or_else(|_| tonic_types::pb::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(status: &Status) -> String {
        status
            .get_error_details()
            .error_info()
            .map(|info| info.reason.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_lost_conflict_is_aborted_and_shedding_carries_retry_info() {
        let conflict = Status::from(Error::StoreConflict("deadlock".into()));
        assert_eq!(
            (conflict.code(), reason(&conflict).as_str()),
            (Code::Aborted, "STORE_CONFLICT")
        );
        let shed = Status::from(Error::Overloaded);
        assert_eq!(
            (shed.code(), reason(&shed).as_str()),
            (Code::ResourceExhausted, "OVERLOADED")
        );
        assert!(shed.get_error_details().retry_info().is_some());
    }

    #[test]
    fn error_texts_stay_small_enough_for_headers() {
        let huge = Status::from(Error::invalid("name", "x".repeat(100_000)));
        assert!(huge.message().len() <= MAX_ERROR_TEXT_BYTES + 3);
    }
}
