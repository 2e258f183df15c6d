//! AdminService: the operators' API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::coordinator::Coordinator;
use crate::domain::auth::Scope;
use crate::store::QueueUpdate;

use super::{access, convert, page_token};
use crate::proto::{self as pb, admin_service_server::AdminService};

pub struct AdminApi {
    coordinator: Arc<Coordinator>,
}

impl AdminApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

/// A page under 4 MiB (spec §10; labels may fill 64 KiB a runtime): it ends early, and its
/// token continues after the last runtime it holds.
fn bounded_runtimes(runtimes: Vec<crate::domain::Runtime>, more: bool) -> pb::ListRuntimesResponse {
    use prost::Message as _;
    let total = runtimes.len();
    let mut page = Vec::with_capacity(total);
    let mut size = 0;
    for runtime in runtimes {
        let runtime = convert::runtime(runtime);
        let runtime_size = runtime.encoded_len() + 8;
        if !page.is_empty() && size + runtime_size > super::tasks::RESPONSE_BUDGET_BYTES {
            break;
        }
        size += runtime_size;
        page.push(runtime);
    }
    let next = (more || page.len() < total)
        .then(|| page.last().map(|last| page_token::encode_name(&last.name)))
        .flatten();
    pb::ListRuntimesResponse {
        runtimes: page,
        next_page_token: next.unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_runtimes(
        &self,
        request: Request<pb::ListRuntimesRequest>,
    ) -> Result<Response<pb::ListRuntimesResponse>, Status> {
        let request = request.into_inner();
        let status = convert::runtime_status_filter("status", request.status)?;
        let after = page_token::decode_name(&request.page_token)?;
        let (runtimes, more) = self
            .coordinator
            .list_runtimes(status, after, request.page_size)
            .await?;
        Ok(Response::new(bounded_runtimes(runtimes, more)))
    }

    async fn describe_queue(
        &self,
        request: Request<pb::DescribeQueueRequest>,
    ) -> Result<Response<pb::DescribeQueueResponse>, Status> {
        access::queue(
            &access::principal(&request)?,
            Scope::Read,
            &request.get_ref().queue,
        )?;
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
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        access::queue(&principal, Scope::Manage, &request.queue)?;
        let update = QueueUpdate {
            max_concurrent: request.max_concurrent,
            paused: request.paused,
            // A zero duration clears the default; absent leaves it as it is.
            default_execution_timeout: convert::duration(
                "default_execution_timeout",
                request.default_execution_timeout,
            )?
            .map(|timeout| Some(timeout).filter(|timeout| !timeout.is_zero())),
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
        let principal = access::principal(&request)?;
        access::task_queue(&self.coordinator, &principal, Scope::Manage, task_id).await?;
        let task = self.coordinator.retry_task(task_id).await?;
        Ok(Response::new(pb::RetryTaskResponse {
            task: Some(convert::task(task)),
        }))
    }

    async fn retry_tasks(
        &self,
        request: Request<pb::RetryTasksRequest>,
    ) -> Result<Response<pb::RetryTasksResponse>, Status> {
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        let filter = super::tasks::bulk_filter(&principal, request.filter)?;
        let crate::coordinator::BulkOutcome { matched, changed } = self
            .coordinator
            .retry_tasks(filter, request.dry_run)
            .await?;
        Ok(Response::new(pb::RetryTasksResponse { matched, changed }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let request = request.into_inner();
        let grants = convert::grants("scopes", &request.scopes)?;
        let expires_in = convert::duration("expires_in", request.expires_in)?
            .filter(|expires_in| !expires_in.is_zero());
        let (key, token) = self
            .coordinator
            .create_api_key(request.name, grants, expires_in)
            .await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(convert::api_key(key)),
            token: token.reveal(),
        }))
    }

    async fn list_api_keys(
        &self,
        _request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let keys = self.coordinator.list_api_keys().await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.into_iter().map(convert::api_key).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let key_id = convert::key_id("key_id", &request.get_ref().key_id)?;
        let key = self.coordinator.revoke_api_key(key_id).await?;
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(convert::api_key(key)),
        }))
    }
}
