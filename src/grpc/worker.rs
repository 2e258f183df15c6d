//! WorkerService: the daemons' API. Handlers convert, call the coordinator, convert back.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::coordinator::Coordinator;
use crate::domain::auth::Scope;
use crate::store::NewRuntime;

use super::{access, claim_stream, convert, deadline, task_writes};
use crate::proto::{self as pb, worker_service_server::WorkerService};

pub struct WorkerApi {
    coordinator: Arc<Coordinator>,
}

impl WorkerApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

type ClaimStream = Pin<Box<dyn Stream<Item = Result<pb::StreamClaimsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register_runtime(
        &self,
        request: Request<pb::RegisterRuntimeRequest>,
    ) -> Result<Response<pb::RegisterRuntimeResponse>, Status> {
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        for queue in &request.queues {
            access::queue(&principal, Scope::Register, queue)?;
        }
        let registration = self
            .coordinator
            .register_runtime(NewRuntime {
                name: request.name,
                queues: request.queues,
                labels: request.labels.into_iter().collect(),
                max_concurrency: request.max_concurrency,
            })
            .await?;
        Ok(Response::new(pb::RegisterRuntimeResponse {
            runtime: Some(convert::runtime(registration.runtime)),
            heartbeat_interval: Some(convert::wire_duration(registration.heartbeat_interval)),
            lease_duration: Some(convert::wire_duration(registration.lease_duration)),
            runtime_token: registration.runtime_token.reveal(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let runtime_id = convert::runtime_id("runtime_id", &request.get_ref().runtime_id)?;
        access::runtime(&access::principal(&request)?, runtime_id)?;
        let ack = self.coordinator.heartbeat(runtime_id).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            server_time: Some(convert::timestamp(ack.server_time)),
            status: convert::runtime_status(ack.status).into(),
        }))
    }

    async fn deregister_runtime(
        &self,
        request: Request<pb::DeregisterRuntimeRequest>,
    ) -> Result<Response<pb::DeregisterRuntimeResponse>, Status> {
        let runtime_id = convert::runtime_id("runtime_id", &request.get_ref().runtime_id)?;
        access::runtime(&access::principal(&request)?, runtime_id)?;
        let requeued = self.coordinator.deregister_runtime(runtime_id).await?;
        Ok(Response::new(pb::DeregisterRuntimeResponse { requeued }))
    }

    async fn recover_orphans(
        &self,
        request: Request<pb::RecoverOrphansRequest>,
    ) -> Result<Response<pb::RecoverOrphansResponse>, Status> {
        let runtime_id = convert::runtime_id("runtime_id", &request.get_ref().runtime_id)?;
        access::runtime(&access::principal(&request)?, runtime_id)?;
        let recovered = self.coordinator.recover_orphans(runtime_id).await?;
        Ok(Response::new(pb::RecoverOrphansResponse {
            failed: recovered.failed(),
            retried: recovered.retried(),
        }))
    }

    async fn claim_task(
        &self,
        request: Request<pb::ClaimTaskRequest>,
    ) -> Result<Response<pb::ClaimTaskResponse>, Status> {
        let budget = deadline::budget(request.metadata());
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        let runtime_id = convert::runtime_id("runtime_id", &request.runtime_id)?;
        access::runtime(&principal, runtime_id)?;
        let wait = convert::duration("wait", request.wait)?.unwrap_or_default();
        let claimed = self
            .coordinator
            .claim_waiting(runtime_id, request.max_tasks, wait, budget)
            .await?;
        Ok(Response::new(pb::ClaimTaskResponse {
            tasks: claimed.into_iter().map(convert::claimed_task).collect(),
        }))
    }

    type StreamClaimsStream = ClaimStream;

    async fn stream_claims(
        &self,
        request: Request<Streaming<pb::StreamClaimsRequest>>,
    ) -> Result<Response<Self::StreamClaimsStream>, Status> {
        let principal = access::principal(&request)?;
        let credential = access::bearer_of(&request);
        let mut inbound = request.into_inner();
        let session =
            claim_stream::open(&self.coordinator, (&principal, credential), &mut inbound).await?;
        let (outbound, responses) = tokio::sync::mpsc::channel(claim_stream::OUTBOUND_BUFFER);
        tokio::spawn(session.run(inbound, outbound));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(responses),
        )))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let acting = access::principal(&request)?.acting_runtime();
        let answer = task_writes::start(&self.coordinator, acting, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let acting = access::principal(&request)?.acting_runtime();
        let request = request.into_inner();
        let task_id = convert::task_id("task_id", &request.task_id)?;
        let token = convert::claim_token(&request.claim_token)?;
        let extend_by = convert::duration("extend_by", request.extend_by)?;
        let expires_at = self
            .coordinator
            .extend_lease(task_id, token, extend_by, acting)
            .await?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            lease_expires_at: Some(convert::timestamp(expires_at)),
        }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let acting = access::principal(&request)?.acting_runtime();
        let answer = task_writes::complete(&self.coordinator, acting, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn fail_task(
        &self,
        request: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let acting = access::principal(&request)?.acting_runtime();
        let answer = task_writes::fail(&self.coordinator, acting, request.into_inner()).await?;
        Ok(Response::new(answer))
    }

    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        let acting = access::principal(&request)?.acting_runtime();
        let request = request.into_inner();
        let task_id = convert::task_id("task_id", &request.task_id)?;
        let token = convert::claim_token(&request.claim_token)?;
        self.coordinator
            .report_usage(
                task_id,
                token,
                request.counters.into_iter().collect(),
                acting,
            )
            .await?;
        Ok(Response::new(pb::ReportUsageResponse {}))
    }

    async fn get_task_status(
        &self,
        request: Request<pb::GetTaskStatusRequest>,
    ) -> Result<Response<pb::GetTaskStatusResponse>, Status> {
        let task_id = convert::task_id("task_id", &request.get_ref().task_id)?;
        let acting = access::principal(&request)?.acting_runtime();
        let (status, attempt) = self.coordinator.task_status(task_id, acting).await?;
        Ok(Response::new(pb::GetTaskStatusResponse {
            status: convert::task_status(status).into(),
            attempt,
        }))
    }
}
