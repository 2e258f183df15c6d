//! The soak's load: a producer, workers speaking gRPC themselves (unary claims and claim
//! streams) that record everything they are told, and `leasehold worker` daemons running a
//! small command.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::checker::DAEMON_RESULT_SUFFIX;
use super::history::{HistoryLog, Kind};
use crate::client::error_reason;
use crate::proto as pb;
use crate::proto::stream_claims_request::Msg as Outbound;
use crate::proto::stream_claims_response::Msg as Inbound;
use crate::proto::task_service_client::TaskServiceClient;
use crate::proto::worker_service_client::WorkerServiceClient;

pub(super) const QUEUE: &str = "soak";
/// Attempts per task: server-side failures (offline runtimes, timeouts) retry it; the soak
/// wants tasks to end COMPLETED, not to run out of attempts.
const MAX_ATTEMPTS: u32 = 100;
/// Tries of one call whose answer was lost, before the worker gives the task up.
const CALL_TRIES: usize = 8;

/// A channel to `address` that reconnects by itself.
pub(super) fn channel(address: &str) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy())
}

/// Enqueues `tasks` tasks over `spread`, in batches, each with a unique payload and an
/// idempotency key, so a batch whose answer was lost is simply sent again.
pub(super) async fn produce(
    channels: Vec<Channel>,
    history: Arc<HistoryLog>,
    tasks: usize,
    spread: Duration,
) {
    const BATCH: usize = 20;
    let pause = spread.div_f64((tasks / BATCH).max(1) as f64);
    for (batch_index, start) in (0..tasks).step_by(BATCH).enumerate() {
        let requests: Vec<pb::EnqueueTaskRequest> = (start..(start + BATCH).min(tasks))
            .map(|index| pb::EnqueueTaskRequest {
                queue: QUEUE.into(),
                payload: format!("task-{index}").into_bytes(),
                idempotency_key: format!("soak-{index}"),
                max_attempts: MAX_ATTEMPTS,
                ..Default::default()
            })
            .collect();
        let mut tasks_client =
            TaskServiceClient::new(channels[batch_index % channels.len()].clone());
        loop {
            let request = pb::EnqueueTasksRequest {
                requests: requests.clone(),
            };
            match tasks_client.enqueue_tasks(request).await {
                Ok(response) => {
                    for (request, result) in requests.iter().zip(response.into_inner().results) {
                        if let Some(task) = result.task {
                            let payload = String::from_utf8_lossy(&request.payload);
                            history.record("producer", Kind::Enqueued, &task.id, "", "", &payload);
                        }
                    }
                    break;
                }
                Err(status) => {
                    history.record(
                        "producer",
                        Kind::TransportError,
                        "",
                        "",
                        &status.code().to_string(),
                        "",
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// How a worker takes tasks.
#[derive(Clone, Copy, Debug)]
pub(super) enum Mode {
    Unary,
    Stream,
}

/// A worker of the soak's own, running as tasks of this process. Every task it spawns (its
/// heartbeat, its executions) ends when it is killed: that is its kill -9.
pub(super) struct SdkWorker {
    pub(super) name: String,
    dead: CancellationToken,
}

/// Spawns `work`, ended at its next await once `dead` is cancelled.
fn spawn_until_dead(
    dead: &CancellationToken,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    let dead = dead.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = dead.cancelled() => {}
            () = work => {}
        }
    })
}

impl SdkWorker {
    pub(super) fn start(
        name: String,
        mode: Mode,
        channel: Channel,
        history: Arc<HistoryLog>,
        seed: u64,
    ) -> SdkWorker {
        let worker_name = name.clone();
        let dead = CancellationToken::new();
        let inner_dead = dead.clone();
        spawn_until_dead(&dead, async move {
            let mut worker = WorkerServiceClient::new(channel);
            let runtime_id = register(&mut worker, &worker_name).await;
            spawn_until_dead(&inner_dead, heartbeat(worker.clone(), runtime_id.clone()));
            let context = Context {
                name: worker_name,
                worker,
                history,
                dead: inner_dead,
            };
            match mode {
                Mode::Unary => unary_loop(context, runtime_id, seed).await,
                Mode::Stream => stream_loop(context, runtime_id, seed).await,
            }
        });
        SdkWorker { name, dead }
    }

    /// As a kill -9 would: no more calls of any kind (heartbeats included), nothing given
    /// back.
    pub(super) fn kill(&self) {
        self.dead.cancel();
    }
}

#[derive(Clone)]
struct Context {
    name: String,
    worker: WorkerServiceClient<Channel>,
    history: Arc<HistoryLog>,
    dead: CancellationToken,
}

async fn register(worker: &mut WorkerServiceClient<Channel>, name: &str) -> String {
    loop {
        let request = pb::RegisterRuntimeRequest {
            name: name.to_owned(),
            queues: vec![QUEUE.into()],
            max_concurrency: 4,
            ..Default::default()
        };
        if let Ok(response) = worker.register_runtime(request).await
            && let Some(runtime) = response.into_inner().runtime
        {
            return runtime.id;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn heartbeat(mut worker: WorkerServiceClient<Channel>, runtime_id: String) {
    loop {
        let _ = worker
            .heartbeat(pb::HeartbeatRequest {
                runtime_id: runtime_id.clone(),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn unary_loop(context: Context, runtime_id: String, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut worker = context.worker.clone();
    loop {
        let request = pb::ClaimTaskRequest {
            runtime_id: runtime_id.clone(),
            max_tasks: Some(1),
            wait: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        };
        let claimed = match worker.claim_task(request).await {
            Ok(response) => response.into_inner().tasks,
            Err(status) => {
                record_error(&context, "", "", &status);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        for claimed in claimed {
            let task_seed = rng.random();
            execute(&context, claimed, task_seed).await;
        }
    }
}

async fn stream_loop(context: Context, runtime_id: String, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let credits = 2;
    loop {
        let (outbound, requests) = mpsc::channel(16);
        // Half the streams ask for their claims started (`auto_start`): that path, too, must
        // lose nothing under the faults.
        let open = Outbound::Open(pb::OpenStream {
            auto_start: rng.random_bool(0.5),
            runtime_id: runtime_id.clone(),
            credits,
        });
        let _ = outbound
            .send(pb::StreamClaimsRequest { msg: Some(open) })
            .await;
        let mut worker = context.worker.clone();
        let mut inbound = match worker.stream_claims(ReceiverStream::new(requests)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                record_error(&context, "", "", &status);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let message = match inbound.message().await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(status) => {
                    record_error(&context, "", "", &status);
                    break;
                }
            };
            if let Some(Inbound::Claimed(claimed)) = message.msg {
                let (context, outbound, task_seed) =
                    (context.clone(), outbound.clone(), rng.random());
                let dead = context.dead.clone();
                spawn_until_dead(&dead, async move {
                    execute(&context, claimed, task_seed).await;
                    let credit = Outbound::Credit(pb::GrantCredit { n: 1 });
                    let _ = outbound
                        .send(pb::StreamClaimsRequest { msg: Some(credit) })
                        .await;
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Start, work for a while, complete: every answer recorded. A call whose answer was lost is
/// sent again with the same token (both are safe to retry); a refusal ends the attempt.
async fn execute(context: &Context, claimed: pb::ClaimedTask, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Some(task) = claimed.task else { return };
    let token = claimed.claim_token;
    context
        .history
        .record(&context.name, Kind::Claimed, &task.id, &token, "", "");
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
    let worker = context.worker.clone();
    let started = if task.status == pb::TaskStatus::Running as i32 {
        // Auto-started: the claim was the accepted start.
        context
            .history
            .record(&context.name, Kind::StartOk, &task.id, &token, "", "");
        true
    } else {
        retried(
            context,
            &task.id,
            &token,
            "",
            Kind::StartOk,
            Kind::StartRefused,
            || {
                let mut worker = worker.clone();
                let request = pb::StartTaskRequest {
                    task_id: task.id.clone(),
                    claim_token: token.clone(),
                };
                async move { worker.start_task(request).await.map(|_| ()) }
            },
        )
        .await
    };
    if !started {
        return;
    }
    tokio::time::sleep(Duration::from_millis(rng.random_range(10..400))).await;
    let result = format!("{}:{token}", String::from_utf8_lossy(&task.payload));
    retried(
        context,
        &task.id,
        &token,
        &result,
        Kind::CompleteOk,
        Kind::CompleteRefused,
        || {
            let request = pb::CompleteTaskRequest {
                task_id: task.id.clone(),
                claim_token: token.clone(),
                result: result.clone().into_bytes(),
            };
            let mut worker = worker.clone();
            async move { worker.complete_task(request).await.map(|_| ()) }
        },
    )
    .await;
}

async fn retried<F, Fut>(
    context: &Context,
    task_id: &str,
    token: &str,
    data: &str,
    accepted: Kind,
    refused: Kind,
    call: F,
) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    for _ in 0..CALL_TRIES {
        match call().await {
            Ok(()) => {
                context
                    .history
                    .record(&context.name, accepted, task_id, token, "", data);
                return true;
            }
            Err(status) => match error_reason(&status) {
                Some(reason) if !crate::client::is_transient(&status) => {
                    context
                        .history
                        .record(&context.name, refused, task_id, token, &reason, data);
                    return false;
                }
                _ => {
                    record_error(context, task_id, token, &status);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    false
}

fn record_error(context: &Context, task_id: &str, token: &str, status: &tonic::Status) {
    context.history.record(
        &context.name,
        Kind::TransportError,
        task_id,
        token,
        &format!("{:?}", status.code()),
        "",
    );
}

/// A `leasehold worker` daemon process running a small shell command per task; its result is
/// `<payload>:daemon`.
pub(super) struct Daemon {
    pub(super) name: String,
    child: tokio::process::Child,
}

impl Daemon {
    /// `unary`: the daemon claims with long-poll `ClaimTask` instead of a claim stream.
    pub(super) fn start(
        name: String,
        address: &str,
        unary: bool,
        log: &std::path::Path,
    ) -> anyhow::Result<Daemon> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let script =
            format!("p=$(cat); sleep 0.$((RANDOM % 3)); printf '%s:{DAEMON_RESULT_SUFFIX}' \"$p\"");
        let child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["worker", "--server", &format!("http://{address}")])
            .args(["--queue", QUEUE, "--name", &name, "--concurrency", "2"])
            .args(["--claim-mode", if unary { "unary" } else { "stream" }])
            .args(["--", "bash", "-c", &script])
            .env_remove("LEASEHOLD_TOKEN")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(Daemon { name, child })
    }

    pub(super) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
