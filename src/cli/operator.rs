//! `leasehold task|queue|runtime …`: the operator's commands, one RPC each.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::render;
use super::{Output, ServerArgs, key_value, rpc_error};
use crate::proto as pb;

/// Flags every operator command shares.
#[derive(Clone, Debug, Args)]
pub(crate) struct CommonArgs {
    #[command(flatten)]
    pub(super) server: ServerArgs,
    /// Print a table for people or JSON for scripts.
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl CommonArgs {
    /// Prints `json` or `text`, whichever `--output` asks for. A closed pipe (`| head`) is not
    /// an error worth a panic.
    pub(super) fn print(&self, json: Value, text: String) {
        let printed = match self.output {
            Output::Json => format!("{json:#}"),
            Output::Table => text,
        };
        let _ = writeln!(std::io::stdout().lock(), "{printed}");
    }
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Enqueue a task.
    Enqueue(EnqueueArgs),
    /// Show one task.
    Get(TaskIdArgs),
    /// List tasks, newest first.
    List(ListArgs),
    /// Cancel a task that has not finished.
    Cancel(TaskIdArgs),
    /// Redrive a FAILED or CANCELLED task (attempt back to 1).
    Retry(TaskIdArgs),
    /// Cancel every unfinished task of a queue matching the filter (CancelTasks).
    CancelAll(BulkArgs),
    /// Redrive every FAILED or CANCELLED task of a queue matching the filter (RetryTasks).
    RetryAll(BulkArgs),
}

/// A bulk operation's filter.
#[derive(Debug, Args)]
pub struct BulkArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long)]
    queue: String,
    /// Repeatable; none = every status the operation can change.
    #[arg(long, value_enum)]
    status: Vec<StatusFilter>,
    /// Tasks pinned to or claimed by this runtime.
    #[arg(long)]
    runtime_id: Option<String>,
    /// Only count what would change.
    #[arg(long)]
    dry_run: bool,
}

impl BulkArgs {
    fn filter(&self) -> Option<pb::TaskFilter> {
        Some(pb::TaskFilter {
            queue: self.queue.clone(),
            statuses: self.status.iter().map(|status| status.wire()).collect(),
            runtime_id: self.runtime_id.clone().unwrap_or_default(),
        })
    }

    fn print(&self, matched: u64, changed: u64) {
        let text = if self.dry_run {
            format!("{matched} tasks would change (dry run)")
        } else {
            format!("{changed} of {matched} matching tasks changed")
        };
        let json =
            serde_json::json!({ "matched": matched, "changed": changed, "dry_run": self.dry_run });
        self.common.print(json, text);
    }
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long)]
    queue: String,
    /// The payload as text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload from a file; `-` reads standard input.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// KEY=VALUE, repeatable.
    #[arg(long = "metadata", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Not claimable before now + delay (`30s`, `5m`).
    #[arg(long, value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// A second enqueue with the same key in the same queue returns the first task.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Attempts before the task fails for good (default 3).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Only this runtime may claim the task.
    #[arg(long)]
    runtime_id: Option<String>,
    /// At most one DISPATCHED/RUNNING task per (queue, key).
    #[arg(long)]
    concurrency_key: Option<String>,
    #[arg(long, value_parser = humantime::parse_duration)]
    execution_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TaskIdArgs {
    #[command(flatten)]
    common: CommonArgs,
    task_id: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StatusFilter {
    Queued,
    Dispatched,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl StatusFilter {
    fn wire(self) -> i32 {
        let status = match self {
            StatusFilter::Queued => pb::TaskStatus::Queued,
            StatusFilter::Dispatched => pb::TaskStatus::Dispatched,
            StatusFilter::Running => pb::TaskStatus::Running,
            StatusFilter::Completed => pb::TaskStatus::Completed,
            StatusFilter::Failed => pb::TaskStatus::Failed,
            StatusFilter::Cancelled => pb::TaskStatus::Cancelled,
        };
        status as i32
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long)]
    queue: Option<String>,
    /// Repeatable; none = every status.
    #[arg(long, value_enum)]
    status: Vec<StatusFilter>,
    /// Tasks pinned to or claimed by this runtime.
    #[arg(long)]
    runtime_id: Option<String>,
    /// Tasks per page (server default 100, max 1000).
    #[arg(long)]
    limit: Option<u32>,
    /// Continue from the `next_page_token` of an earlier page.
    #[arg(long)]
    page_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Counts per status, the cap, the pause flag and the oldest queued task's age.
    Describe(QueueArgs),
    /// Change the cap or the execution-time default, or pause/resume the queue.
    Update(UpdateQueueArgs),
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    #[command(flatten)]
    common: CommonArgs,
    queue: String,
}

#[derive(Debug, Args)]
pub struct UpdateQueueArgs {
    #[command(flatten)]
    common: CommonArgs,
    queue: String,
    /// Cap on DISPATCHED+RUNNING tasks across the queue; 0 = unlimited.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// `true` stops claims from the queue; `false` resumes them.
    #[arg(long)]
    paused: Option<bool>,
    /// RUNNING tasks without their own execution timeout fail (retryable) after running this
    /// long, e.g. `30m`; `0s` removes the default.
    #[arg(long, value_parser = humantime::parse_duration)]
    default_execution_timeout: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum RuntimeCommand {
    /// List registered runtimes.
    List(RuntimeListArgs),
}

#[derive(Debug, Args)]
pub struct RuntimeListArgs {
    #[command(flatten)]
    common: CommonArgs,
    #[arg(long, value_enum)]
    status: Option<RuntimeFilter>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuntimeFilter {
    Online,
    Offline,
}

impl TaskCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            TaskCommand::Enqueue(args) => enqueue(args).await,
            TaskCommand::Get(args) => {
                let request = pb::GetTaskRequest {
                    task_id: args.task_id.clone(),
                };
                let mut tasks = args.common.server.client()?.tasks();
                let response = tasks.get_task(request).await.map_err(rpc_error)?;
                print_task(&args.common, response.into_inner().task);
                Ok(())
            }
            TaskCommand::List(args) => list(args).await,
            TaskCommand::Cancel(args) => {
                let request = pb::CancelTaskRequest {
                    task_id: args.task_id.clone(),
                };
                let mut tasks = args.common.server.client()?.tasks();
                let response = tasks.cancel_task(request).await.map_err(rpc_error)?;
                print_task(&args.common, response.into_inner().task);
                Ok(())
            }
            TaskCommand::Retry(args) => {
                let request = pb::RetryTaskRequest {
                    task_id: args.task_id.clone(),
                };
                let mut admin = args.common.server.client()?.admin();
                let response = admin.retry_task(request).await.map_err(rpc_error)?;
                print_task(&args.common, response.into_inner().task);
                Ok(())
            }
            TaskCommand::CancelAll(args) => {
                let request = pb::CancelTasksRequest {
                    filter: args.filter(),
                    dry_run: args.dry_run,
                };
                let mut tasks = args.common.server.client()?.tasks();
                let answer = tasks.cancel_tasks(request).await.map_err(rpc_error)?;
                let answer = answer.into_inner();
                args.print(answer.matched, answer.changed);
                Ok(())
            }
            TaskCommand::RetryAll(args) => {
                let request = pb::RetryTasksRequest {
                    filter: args.filter(),
                    dry_run: args.dry_run,
                };
                let mut admin = args.common.server.client()?.admin();
                let answer = admin.retry_tasks(request).await.map_err(rpc_error)?;
                let answer = answer.into_inner();
                args.print(answer.matched, answer.changed);
                Ok(())
            }
        }
    }
}

fn print_task(common: &CommonArgs, task: Option<pb::Task>) {
    let task = task.unwrap_or_default();
    common.print(render::task_json(&task), render::task_fields(&task));
}

pub(super) fn wire_duration(
    duration: Option<Duration>,
) -> anyhow::Result<Option<prost_types::Duration>> {
    duration
        .map(prost_types::Duration::try_from)
        .transpose()
        .map_err(|error| anyhow::anyhow!("duration out of range: {error}"))
}

fn read_payload(args: &EnqueueArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(text) = &args.payload {
        return Ok(text.clone().into_bytes());
    }
    let Some(path) = &args.payload_file else {
        return Ok(Vec::new());
    };
    let mut payload = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut payload)?;
    } else {
        payload = std::fs::read(path)
            .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
    }
    Ok(payload)
}

async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let request = pb::EnqueueTaskRequest {
        queue: args.queue.clone(),
        payload: read_payload(&args)?,
        metadata: args.metadata.iter().cloned().collect::<HashMap<_, _>>(),
        priority: args.priority,
        runtime_id: args.runtime_id.clone().unwrap_or_default(),
        concurrency_key: args.concurrency_key.clone().unwrap_or_default(),
        idempotency_key: args.idempotency_key.clone().unwrap_or_default(),
        max_attempts: args.max_attempts.unwrap_or(0),
        delay: wire_duration(args.delay)?,
        execution_timeout: wire_duration(args.execution_timeout)?,
    };
    let mut tasks = args.common.server.client()?.tasks();
    let response = tasks
        .enqueue_task(request)
        .await
        .map_err(rpc_error)?
        .into_inner();
    let task = response.task.unwrap_or_default();
    let mut json = render::task_json(&task);
    json["deduplicated"] = json!(response.deduplicated);
    let mut text = render::task_fields(&task);
    if response.deduplicated {
        text.push_str("\n(deduplicated: the idempotency key matched this existing task)");
    }
    args.common.print(json, text);
    Ok(())
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let request = pb::ListTasksRequest {
        queue: args.queue.clone().unwrap_or_default(),
        statuses: args.status.iter().map(|status| status.wire()).collect(),
        runtime_id: args.runtime_id.clone().unwrap_or_default(),
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
    };
    let mut tasks = args.common.server.client()?.tasks();
    let page = tasks
        .list_tasks(request)
        .await
        .map_err(rpc_error)?
        .into_inner();
    let json = json!({
        "tasks": page.tasks.iter().map(render::task_json).collect::<Vec<_>>(),
        "nextPageToken": page.next_page_token,
    });
    let mut text = render::task_rows(&page.tasks);
    if !page.next_page_token.is_empty() {
        text.push_str(&format!("\n(more: --page-token {})", page.next_page_token));
    }
    args.common.print(json, text);
    Ok(())
}

impl QueueCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let (common, queue) = match self {
            QueueCommand::Describe(args) => {
                let request = pb::DescribeQueueRequest { queue: args.queue };
                let mut admin = args.common.server.client()?.admin();
                let queue = admin.describe_queue(request).await.map_err(rpc_error)?;
                (args.common, queue.into_inner())
            }
            QueueCommand::Update(args) => {
                let request = pb::UpdateQueueRequest {
                    queue: args.queue,
                    max_concurrent: args.max_concurrent,
                    paused: args.paused,
                    default_execution_timeout: wire_duration(args.default_execution_timeout)?,
                };
                let mut admin = args.common.server.client()?.admin();
                let queue = admin.update_queue(request).await.map_err(rpc_error)?;
                (args.common, queue.into_inner())
            }
        };
        common.print(render::queue_json(&queue), render::queue_fields(&queue));
        Ok(())
    }
}

impl RuntimeCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        let RuntimeCommand::List(args) = self;
        let status = args.status.map(|status| match status {
            RuntimeFilter::Online => pb::RuntimeStatus::Online as i32,
            RuntimeFilter::Offline => pb::RuntimeStatus::Offline as i32,
        });
        let mut admin = args.common.server.client()?.admin();
        // Every page: an operator listing runtimes wants them all.
        let mut runtimes = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = admin
                .list_runtimes(pb::ListRuntimesRequest {
                    status,
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            runtimes.extend(page.runtimes);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let json = json!({
            "runtimes": runtimes.iter().map(render::runtime_json).collect::<Vec<_>>(),
        });
        args.common.print(json, render::runtime_rows(&runtimes));
        Ok(())
    }
}
