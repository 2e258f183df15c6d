//! AdminService: the operators' API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::coordinator::Coordinator;
use crate::store::QueueUpdate;

use super::convert;
use super::pb::{self, admin_service_server::AdminService};

pub struct AdminApi {
    coordinator: Arc<Coordinator>,
}

impl AdminApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_runtimes(
        &self,
        request: Request<pb::ListRuntimesRequest>,
    ) -> Result<Response<pb::ListRuntimesResponse>, Status> {
        let status = convert::runtime_status_filter("status", request.get_ref().status)?;
        let runtimes = self.coordinator.list_runtimes(status).await?;
        Ok(Response::new(pb::ListRuntimesResponse {
            runtimes: runtimes.into_iter().map(convert::runtime).collect(),
        }))
    }

    async fn describe_queue(
        &self,
        request: Request<pb::DescribeQueueRequest>,
    ) -> Result<Response<pb::DescribeQueueResponse>, Status> {
        let info = self
            .coordinator
            .describe_queue(&request.get_ref().queue)
            .await?;
        Ok(Response::new(convert::queue(info)))
    }

    async fn update_queue(
        &self,
        request: Request<pb::UpdateQueueRequest>,
    ) -> Result<Response<pb::DescribeQueueResponse>, Status> {
        let request = request.into_inner();
        let update = QueueUpdate {
            max_concurrent: request.max_concurrent,
            paused: request.paused,
        };
        let info = self
            .coordinator
            .update_queue(&request.queue, update)
            .await?;
        Ok(Response::new(convert::queue(info)))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        let task_id = convert::task_id("task_id", &request.get_ref().task_id)?;
        let task = self.coordinator.retry_task(task_id).await?;
        Ok(Response::new(pb::RetryTaskResponse {
            task: Some(convert::task(task)),
        }))
    }
}
