//! TaskService: the producers' and operators' API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::coordinator::{BulkOutcome, Coordinator};
use crate::domain::auth::{Principal, Scope};
use crate::domain::{Error, Result, TaskStatus, validate};
use crate::store::{Enqueued, NewTask, PageCursor, TaskFilter, TaskPage};

use super::{access, convert, page_token, status};
use crate::proto::{self as pb, task_service_server::TaskService};

pub struct TaskApi {
    coordinator: Arc<Coordinator>,
}

impl TaskApi {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Self { coordinator }
    }
}

fn new_task(request: pb::EnqueueTaskRequest) -> Result<NewTask> {
    Ok(NewTask {
        pinned_to: convert::optional_runtime_id("runtime_id", &request.runtime_id)?,
        concurrency_key: validate::optional_key("concurrency_key", &request.concurrency_key)?,
        idempotency_key: validate::optional_key("idempotency_key", &request.idempotency_key)?,
        delay: convert::duration("delay", request.delay)?.unwrap_or_default(),
        execution_timeout: convert::duration("execution_timeout", request.execution_timeout)?
            .filter(|timeout| !timeout.is_zero()),
        queue: request.queue,
        payload: request.payload,
        metadata: request.metadata.into_iter().collect(),
        priority: request.priority,
        max_attempts: request.max_attempts,
    })
}

fn enqueue_result(result: Result<Enqueued>) -> pb::EnqueueTasksResult {
    match result {
        Ok(enqueued) => pb::EnqueueTasksResult {
            task: Some(convert::task(enqueued.task)),
            deduplicated: enqueued.deduplicated,
            error: None,
        },
        Err(error) => pb::EnqueueTasksResult {
            task: None,
            deduplicated: false,
            error: Some(status::rpc_status(Status::from(error))),
        },
    }
}

/// No response may exceed 4 MiB, the default receive limit of gRPC clients (spec §10): a page
/// ends early, before the task that would take it past this, and its token continues from
/// the last task it holds. (One task always fits: payload, result and error are each at most
/// `--max-payload-bytes`, 1 MiB by default, and metadata 64 KiB.)
pub(super) const RESPONSE_BUDGET_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;

fn bounded_page(page: TaskPage) -> pb::ListTasksResponse {
    use prost::Message as _;
    let mut next = page.next;
    let mut tasks = Vec::with_capacity(page.tasks.len());
    let mut last_kept: Option<PageCursor> = None;
    let mut size = 0;
    for task in page.tasks {
        let cursor = PageCursor {
            created_at: task.created_at,
            id: task.id,
        };
        let task = convert::task(task);
        // The field tag and length prefix of each repeated entry take a few bytes more.
        let task_size = task.encoded_len() + 8;
        if last_kept.is_some() && size + task_size > RESPONSE_BUDGET_BYTES {
            next = last_kept;
            break;
        }
        size += task_size;
        last_kept = Some(cursor);
        tasks.push(task);
    }
    pb::ListTasksResponse {
        tasks,
        next_page_token: next.map(page_token::encode).unwrap_or_default(),
    }
}

fn statuses(field: &str, wire: &[i32]) -> Result<Vec<TaskStatus>> {
    wire.iter()
        .map(|status| convert::task_status_from_wire(field, *status))
        .collect()
}

fn task_filter(request: &pb::ListTasksRequest) -> Result<TaskFilter> {
    Ok(TaskFilter {
        queue: Some(request.queue.clone()).filter(|queue| !queue.is_empty()),
        statuses: statuses("statuses", &request.statuses)?,
        runtime_id: convert::optional_runtime_id("runtime_id", &request.runtime_id)?,
        ..TaskFilter::default()
    })
}

/// A bulk operation's filter, and the check that the caller may manage its queue.
pub(super) fn bulk_filter(
    principal: &Principal,
    filter: Option<pb::TaskFilter>,
) -> Result<TaskFilter> {
    let filter = filter.ok_or_else(|| Error::invalid("filter", "a bulk operation needs one"))?;
    access::queue(principal, Scope::Manage, &filter.queue)?;
    Ok(TaskFilter {
        queue: Some(filter.queue),
        statuses: statuses("filter.statuses", &filter.statuses)?,
        runtime_id: convert::optional_runtime_id("filter.runtime_id", &filter.runtime_id)?,
        ..TaskFilter::default()
    })
}

#[tonic::async_trait]
impl TaskService for TaskApi {
    async fn enqueue_task(
        &self,
        request: Request<pb::EnqueueTaskRequest>,
    ) -> Result<Response<pb::EnqueueTaskResponse>, Status> {
        let principal = access::principal(&request)?;
        let task = new_task(request.into_inner())?;
        access::queue(&principal, Scope::Enqueue, &task.queue)?;
        let enqueued = self.coordinator.enqueue(task).await?;
        Ok(Response::new(pb::EnqueueTaskResponse {
            task: Some(convert::task(enqueued.task)),
            deduplicated: enqueued.deduplicated,
        }))
    }

    async fn enqueue_tasks(
        &self,
        request: Request<pb::EnqueueTasksRequest>,
    ) -> Result<Response<pb::EnqueueTasksResponse>, Status> {
        let principal = access::principal(&request)?;
        // An item for a queue outside the caller's scope gets its own error, as an invalid one.
        let items = request
            .into_inner()
            .requests
            .into_iter()
            .map(|item| {
                let task = new_task(item)?;
                access::queue(&principal, Scope::Enqueue, &task.queue)?;
                Ok(task)
            })
            .collect();
        let results = self.coordinator.enqueue_batch(items).await?;
        Ok(Response::new(pb::EnqueueTasksResponse {
            results: results.into_iter().map(enqueue_result).collect(),
        }))
    }

    async fn get_task(
        &self,
        request: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let task_id = convert::task_id("task_id", &request.get_ref().task_id)?;
        let task = self.coordinator.get_task(task_id).await?;
        access::queue(&access::principal(&request)?, Scope::Read, &task.queue)?;
        Ok(Response::new(pb::GetTaskResponse {
            task: Some(convert::task(task)),
        }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        let filter = task_filter(&request)?;
        // A key limited to some queues must name one of them.
        if !principal.has(Scope::Read, None) {
            access::queue(
                &principal,
                Scope::Read,
                filter.queue.as_deref().unwrap_or_default(),
            )?;
        }
        let after = page_token::decode(&request.page_token)?;
        let page = self
            .coordinator
            .list_tasks(filter, after, request.page_size)
            .await?;
        Ok(Response::new(bounded_page(page)))
    }

    async fn cancel_tasks(
        &self,
        request: Request<pb::CancelTasksRequest>,
    ) -> Result<Response<pb::CancelTasksResponse>, Status> {
        let principal = access::principal(&request)?;
        let request = request.into_inner();
        let filter = bulk_filter(&principal, request.filter)?;
        let BulkOutcome { matched, changed } = self
            .coordinator
            .cancel_tasks(filter, request.dry_run)
            .await?;
        Ok(Response::new(pb::CancelTasksResponse { matched, changed }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let task_id = convert::task_id("task_id", &request.get_ref().task_id)?;
        let principal = access::principal(&request)?;
        access::task_queue(&self.coordinator, &principal, Scope::Manage, task_id).await?;
        let task = self.coordinator.cancel(task_id).await?;
        Ok(Response::new(pb::CancelTaskResponse {
            task: Some(convert::task(task)),
        }))
    }
}
