//! Task writes carried on a claim stream (`StreamWrite`): StartTask, CompleteTask and FailTask
//! without a call each. Each write runs as its unary call does (`task_writes`: the same
//! conversion, fence, replay rules, group commit and errors), the stream's credential checked
//! again as every call's is. Its answer (`StreamWritten`) echoes the
//! worker's request_id; writes run concurrently, so answers may come in any order.
//!
//! A stream holds at most [`WRITES_IN_FLIGHT`] writes at once (spec §10); one more is refused
//! at once with OVERLOADED, the limit unary calls meet under load.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tonic::Status;

use super::claim_stream::Sender;
use super::observe::count_refusal;
use super::status::rpc_status;
use super::task_writes;
use crate::coordinator::Coordinator;
use crate::domain::Error;
use crate::proto::{self as pb, stream_claims_response::Msg as Outbound, stream_write::Call};

/// Writes one stream may have running at once.
pub(super) const WRITES_IN_FLIGHT: usize = 256;

/// What one stream needs to run its writes.
pub(super) struct StreamWrites {
    coordinator: Arc<Coordinator>,
    /// The bearer token the stream opened with, checked again for every write.
    credential: Option<String>,
    in_flight: Arc<Semaphore>,
}

impl StreamWrites {
    pub(super) fn new(coordinator: Arc<Coordinator>, credential: Option<String>) -> Self {
        Self {
            coordinator,
            credential,
            in_flight: Arc::new(Semaphore::new(WRITES_IN_FLIGHT)),
        }
    }

    /// Runs `write` beside the stream and sends its answer on `outbound`.
    pub(super) fn spawn(&self, write: pb::StreamWrite, outbound: &Sender) {
        let coordinator = self.coordinator.clone();
        let credential = self.credential.clone();
        let outbound = outbound.clone();
        let permit = self.in_flight.clone().try_acquire_owned();
        tokio::spawn(async move {
            let outcome = match permit {
                Ok(_permit) => run(&coordinator, credential.as_deref(), write.call).await,
                Err(_) => Err(Error::Overloaded.into()),
            };
            let written = match outcome {
                Ok((task, will_retry)) => pb::StreamWritten {
                    request_id: write.request_id,
                    task,
                    will_retry,
                    error: None,
                },
                Err(status) => {
                    count_refusal(coordinator.metrics(), &status);
                    pb::StreamWritten {
                        request_id: write.request_id,
                        task: None,
                        will_retry: false,
                        error: Some(rpc_status(status)),
                    }
                }
            };
            let answer = pb::StreamClaimsResponse {
                msg: Some(Outbound::Written(written)),
            };
            // A worker that left gets no answer; the write itself stands.
            let _ = outbound.send(Ok(answer)).await;
        });
    }
}

/// The unary call `call` stands for (`task_writes`): the task it left and, for a fail,
/// whether it retries.
async fn run(
    coordinator: &Coordinator,
    credential: Option<&str>,
    call: Option<Call>,
) -> Result<(Option<pb::Task>, bool), Status> {
    let acting = coordinator.authenticate(credential).await?.acting_runtime();
    let (task, will_retry) = match call {
        Some(Call::Start(request)) => {
            let answer = task_writes::start(coordinator, acting, request).await?;
            (answer.task, false)
        }
        Some(Call::Complete(request)) => {
            let answer = task_writes::complete(coordinator, acting, request).await?;
            (answer.task, false)
        }
        Some(Call::Fail(request)) => {
            let answer = task_writes::fail(coordinator, acting, request).await?;
            (answer.task, answer.will_retry)
        }
        None => return Err(Error::invalid("write.call", "one of start, complete, fail").into()),
    };
    Ok((task, will_retry))
}
