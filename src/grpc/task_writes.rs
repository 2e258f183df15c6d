//! The three owner writes a worker sends per task — StartTask, CompleteTask, FailTask — from
//! request to answer: converted, run through the coordinator (fence, replays, group commit),
//! converted back. The unary calls (`worker.rs`) and the claim stream's writes
//! (`stream_writes.rs`) both run them from here, so a write on the stream is its call.

use tonic::Status;

use super::convert;
use crate::coordinator::Coordinator;
use crate::domain::{ClaimToken, RuntimeId, TaskId};
use crate::proto as pb;

pub(super) async fn start(
    coordinator: &Coordinator,
    acting: Option<RuntimeId>,
    request: pb::StartTaskRequest,
) -> Result<pb::StartTaskResponse, Status> {
    let (task_id, token) = fence(&request.task_id, &request.claim_token)?;
    let task = coordinator.start(task_id, token, acting).await?;
    Ok(pb::StartTaskResponse {
        task: Some(convert::task(task)),
    })
}

pub(super) async fn complete(
    coordinator: &Coordinator,
    acting: Option<RuntimeId>,
    request: pb::CompleteTaskRequest,
) -> Result<pb::CompleteTaskResponse, Status> {
    let (task_id, token) = fence(&request.task_id, &request.claim_token)?;
    let task = coordinator
        .complete(task_id, token, request.result, acting)
        .await?;
    Ok(pb::CompleteTaskResponse {
        task: Some(convert::task(task)),
    })
}

pub(super) async fn fail(
    coordinator: &Coordinator,
    acting: Option<RuntimeId>,
    request: pb::FailTaskRequest,
) -> Result<pb::FailTaskResponse, Status> {
    let (task_id, token) = fence(&request.task_id, &request.claim_token)?;
    let outcome = coordinator
        .fail(task_id, token, request.error, request.retryable, acting)
        .await?;
    Ok(pb::FailTaskResponse {
        task: Some(convert::task(outcome.task)),
        will_retry: outcome.will_retry,
    })
}

/// The task and the claim token a write names.
fn fence(task_id: &str, claim_token: &str) -> Result<(TaskId, ClaimToken), Status> {
    let task_id = convert::task_id("task_id", task_id)?;
    let token = convert::claim_token(claim_token)?;
    Ok((task_id, token))
}
