//! One claimed task, from claim to final report:
//!
//! 1. `prepare`, with `ExtendLease` every third of the lease while it runs;
//! 2. `StartTask` (the rules of [`start`]);
//!
//! (A claim that arrives RUNNING, started by the claim itself (`auto_start`), skips both the
//! lease keeping and `StartTask`: it holds no lease and is already started.)
//! 3. `run`, with the cancellation watcher;
//! 4. usage, reported once whatever happened;
//! 5. `CompleteTask` or `FailTask`, retried on transient errors until the report deadline.
//!
//! A claim the server says is no longer ours (`FAILED_PRECONDITION`/`ALREADY_EXISTS`) is
//! dropped silently: another worker or the server owns the task now.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tonic::Status;

use super::backoff::Backoff;
use super::handler::{TaskContext, TaskError};
use super::shared::{Shared, Tracked, sleep_unless};
use super::{is_claim_lost, is_transient};
use crate::proto as pb;
use crate::proto::stream_write::Call;

/// How one task ends, as far as the worker is concerned.
#[derive(Debug)]
enum Verdict {
    Complete(Vec<u8>),
    Fail(TaskError),
    /// Nothing to report: the claim is not ours any more.
    Drop(&'static str),
}

/// Each call of a final report waits this long at most before it counts as transient.
const REPORT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Processes one claimed task; `_slot` is released when it returns.
pub(super) async fn process(
    shared: Arc<Shared>,
    claimed: pb::ClaimedTask,
    _slot: OwnedSemaphorePermit,
) {
    let Some(task) = claimed.task else { return };
    let started_by_claim = task.status == pb::TaskStatus::Running as i32;
    let task_id = task.id.clone();
    let token = claimed.claim_token;
    let tracked = shared.track(&task_id);
    let context = TaskContext::new(task, tracked.cancelled.clone());
    let run = TaskRun {
        shared: &shared,
        context: &context,
        task_id: &task_id,
        token: &token,
        tracked: &tracked,
        started_by_claim,
    };
    let verdict = run.drive().await;
    run.report_usage().await;
    run.report(verdict).await;
    shared.untrack(&task_id);
}

struct TaskRun<'a> {
    shared: &'a Shared,
    context: &'a TaskContext,
    task_id: &'a str,
    token: &'a str,
    tracked: &'a Tracked,
    /// Auto-started: the claim made the task RUNNING.
    started_by_claim: bool,
}

impl TaskRun<'_> {
    async fn drive(&self) -> Verdict {
        let prepared = if self.started_by_claim {
            self.shared
                .handler
                .prepare(self.context)
                .await
                .map_err(Verdict::Fail)
        } else {
            self.prepare().await
        };
        if let Err(verdict) = prepared {
            return verdict;
        }
        if self.context.cancelled().is_cancelled() {
            if self.started_by_claim && !self.tracked.by_server.load(Ordering::SeqCst) {
                // Shutting down before the handler ran a task its claim started: give it back
                // for a retry (DeregisterRuntime requeues only unstarted claims).
                return Verdict::Fail(TaskError::retryable("the worker stopped before running it"));
            }
            // Cancelled, or shutting down, before it started: leave it to the server (a
            // cancelled task is finished; an unstarted claim is requeued by DeregisterRuntime).
            return Verdict::Drop("cancelled before it started");
        }
        if !self.started_by_claim
            && let Err(verdict) = self.start().await
        {
            return verdict;
        }
        let outcome = self.run().await;
        if self.tracked.by_server.load(Ordering::SeqCst) {
            return Verdict::Drop("cancelled while running");
        }
        match outcome {
            Ok(result) => Verdict::Complete(result),
            Err(error) if self.shared.abort.is_cancelled() => Verdict::Fail(TaskError::retryable(
                format!("interrupted by worker shutdown: {error}"),
            )),
            Err(error) => Verdict::Fail(error),
        }
    }

    /// Runs the handler's `prepare`, keeping the lease alive meanwhile.
    async fn prepare(&self) -> Result<(), Verdict> {
        let every = self.shared.lease_duration() / 3;
        let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
        let prepare = self.shared.handler.prepare(self.context);
        tokio::pin!(prepare);
        loop {
            tokio::select! {
                prepared = &mut prepare => return prepared.map_err(Verdict::Fail),
                _ = ticks.tick() => match self.extend_lease().await {
                    Ok(()) => {}
                    Err(status) if is_claim_lost(&status) => {
                        self.context.cancelled().cancel();
                        return Err(Verdict::Drop("the lease was lost while preparing"));
                    }
                    Err(status) => tracing::warn!(
                        task_id = self.task_id, error = %status.message(), "ExtendLease failed"
                    ),
                },
            }
        }
    }

    async fn extend_lease(&self) -> Result<(), Status> {
        let request = pb::ExtendLeaseRequest {
            task_id: self.task_id.to_owned(),
            claim_token: self.token.to_owned(),
            extend_by: None,
        };
        self.shared.client().worker().extend_lease(request).await?;
        Ok(())
    }

    /// `StartTask`: OK → run; claim lost → drop; a transient failure → one retry with the same
    /// token, then `GetTaskStatus` decides (RUNNING at our attempt: the first start landed);
    /// anything else → fail the task.
    async fn start(&self) -> Result<(), Verdict> {
        let first = match self.call_start().await {
            Ok(()) => return Ok(()),
            Err(status) if is_claim_lost(&status) => return Err(Verdict::Drop("claim lost")),
            Err(status) if is_transient(&status) => status,
            Err(status) => return Err(start_failed(&status)),
        };
        tracing::debug!(task_id = self.task_id, error = %first.message(), "retrying StartTask");
        tokio::time::sleep(self.shared.config.start_retry_pause).await;
        let second = match self.call_start().await {
            Ok(()) => return Ok(()),
            Err(status) if is_claim_lost(&status) => return Err(Verdict::Drop("claim lost")),
            Err(status) => status,
        };
        if self.started_at_our_attempt().await {
            return Ok(());
        }
        Err(start_failed(&second))
    }

    async fn call_start(&self) -> Result<(), Status> {
        let request = pb::StartTaskRequest {
            task_id: self.task_id.to_owned(),
            claim_token: self.token.to_owned(),
        };
        self.shared.client().worker().start_task(request).await?;
        Ok(())
    }

    async fn started_at_our_attempt(&self) -> bool {
        match self.task_status().await {
            Ok(status) => {
                status.status == pb::TaskStatus::Running as i32
                    && status.attempt == self.context.task().attempt
            }
            Err(_) => false,
        }
    }

    async fn task_status(&self) -> Result<pb::GetTaskStatusResponse, Status> {
        let request = pb::GetTaskStatusRequest {
            task_id: self.task_id.to_owned(),
        };
        Ok(self
            .shared
            .client()
            .worker()
            .get_task_status(request)
            .await?
            .into_inner())
    }

    /// The handler's `run`, beside the cancellation watcher when claims come by long-poll
    /// (a stream delivers cancellations itself).
    async fn run(&self) -> Result<Vec<u8>, TaskError> {
        let run = self.shared.handler.run(self.context);
        tokio::pin!(run);
        if self.shared.streaming.load(Ordering::SeqCst) {
            return run.await;
        }
        tokio::select! {
            outcome = &mut run => outcome,
            () = self.watch_for_cancellation() => run.await,
        }
    }

    /// Polls `GetTaskStatus` until the task is no longer RUNNING at our attempt, then cancels
    /// the handler.
    async fn watch_for_cancellation(&self) {
        let every = self.shared.config.cancel_poll_interval;
        loop {
            if !sleep_unless(self.context.cancelled(), every).await {
                return std::future::pending().await;
            }
            match self.task_status().await {
                Ok(status)
                    if status.status == pb::TaskStatus::Running as i32
                        && status.attempt == self.context.task().attempt => {}
                Ok(_) => {
                    self.tracked.by_server.store(true, Ordering::SeqCst);
                    self.context.cancelled().cancel();
                }
                Err(status) => tracing::debug!(
                    task_id = self.task_id, error = %status.message(), "status poll failed"
                ),
            }
        }
    }

    /// Reports the usage counters the handler recorded, once.
    async fn report_usage(&self) {
        let counters = self.context.take_usage();
        if counters.is_empty() {
            return;
        }
        let request = pb::ReportUsageRequest {
            task_id: self.task_id.to_owned(),
            claim_token: self.token.to_owned(),
            counters,
        };
        self.retry_report("ReportUsage", Persistence::UntilDeadline, || {
            let request = request.clone();
            let mut worker = self.shared.client().worker();
            async move { worker.report_usage(request).await.map(drop) }
        })
        .await;
    }

    async fn report(&self, verdict: Verdict) {
        match verdict {
            Verdict::Complete(result) => {
                let request = pb::CompleteTaskRequest {
                    task_id: self.task_id.to_owned(),
                    claim_token: self.token.to_owned(),
                    result,
                };
                self.retry_report("CompleteTask", Persistence::WhileAlive, || {
                    let request = request.clone();
                    let shared = self.shared;
                    async move {
                        match shared.stream_writer() {
                            Some(writer) => writer.write(Call::Complete(request)).await,
                            None => shared
                                .client()
                                .worker()
                                .complete_task(request)
                                .await
                                .map(drop),
                        }
                    }
                })
                .await;
            }
            Verdict::Fail(error) => {
                let request = pb::FailTaskRequest {
                    task_id: self.task_id.to_owned(),
                    claim_token: self.token.to_owned(),
                    error: error.message,
                    retryable: error.retryable,
                };
                self.retry_report("FailTask", Persistence::WhileAlive, || {
                    let request = request.clone();
                    let shared = self.shared;
                    async move {
                        match shared.stream_writer() {
                            Some(writer) => writer.write(Call::Fail(request)).await,
                            None => shared.client().worker().fail_task(request).await.map(drop),
                        }
                    }
                })
                .await;
            }
            Verdict::Drop(why) => tracing::info!(task_id = self.task_id, why, "task dropped"),
        }
    }

    /// Sends a token-fenced report until it lands or is refused for good; a usage report gives
    /// up at the report deadline, a finished task's report never does while the process lives
    /// (spec §10: the server's sweeper would otherwise run it again). Replays with the same
    /// token are safe: the server answers them with success.
    async fn retry_report<F, Fut>(&self, rpc: &'static str, persistence: Persistence, mut call: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), Status>>,
    {
        let deadline = Instant::now() + self.shared.config.report_deadline;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut warned = false;
        loop {
            let error = match tokio::time::timeout(REPORT_CALL_TIMEOUT, call()).await {
                Ok(Ok(())) => return,
                Ok(Err(status)) if is_transient(&status) => status,
                Ok(Err(status)) => {
                    tracing::warn!(task_id = self.task_id, rpc, error = %status.message(),
                        "report refused");
                    return;
                }
                Err(_) => Status::deadline_exceeded("no answer"),
            };
            let delay = backoff.next_delay();
            if Instant::now() + delay > deadline {
                match persistence {
                    Persistence::UntilDeadline => {
                        tracing::error!(task_id = self.task_id, rpc, error = %error.message(),
                            "giving up on the report");
                        return;
                    }
                    Persistence::WhileAlive if !warned => {
                        warned = true;
                        tracing::error!(task_id = self.task_id, rpc, error = %error.message(),
                            "the server has not taken this finished task's report for a while; \
                             still trying");
                    }
                    Persistence::WhileAlive => {}
                }
            }
            tracing::debug!(task_id = self.task_id, rpc, error = %error.message(), "retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// How long a report keeps being retried.
#[derive(Clone, Copy)]
enum Persistence {
    UntilDeadline,
    /// A finished task's result or failure: lost, the task would run again.
    WhileAlive,
}

fn start_failed(status: &Status) -> Verdict {
    Verdict::Fail(TaskError::retryable(format!(
        "StartTask failed: {}",
        status.message()
    )))
}
