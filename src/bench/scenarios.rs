//! The scenarios of `leasehold bench`, each a client-side workload over real gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::try_join_all;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::proto as pb;
use crate::proto::stream_claims_request::Msg as Outbound;
use crate::proto::stream_claims_response::Msg as Inbound;

/// Largest `EnqueueTasks` batch the bench sends (the server takes up to 1,000).
const ENQUEUE_BATCH: usize = 500;

pub(super) struct Latencies(Vec<Duration>);

impl Latencies {
    pub(super) fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort();
        Latencies(samples)
    }

    /// The `quantile` sample, in milliseconds.
    pub(super) fn millis(&self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let index = ((self.0.len() - 1) as f64 * quantile).round() as usize;
        self.0[index].as_secs_f64() * 1000.0
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

pub(super) async fn register(client: &Client, name: String, queue: &str) -> anyhow::Result<String> {
    Ok(register_worker(client, name, queue).await?.id)
}

/// A registered runtime and the client its calls go through: under `--auth token` one carrying
/// the runtime's own token, as a daemon's does.
#[derive(Clone)]
pub(super) struct Registered {
    pub(super) id: String,
    pub(super) client: Client,
}

pub(super) async fn register_worker(
    client: &Client,
    name: String,
    queue: &str,
) -> anyhow::Result<Registered> {
    register_holding(client, name, queue, 32).await
}

/// [`register_worker`] with its own `max_concurrency` (0: no limit).
pub(super) async fn register_holding(
    client: &Client,
    name: String,
    queue: &str,
    max_concurrency: u32,
) -> anyhow::Result<Registered> {
    let request = pb::RegisterRuntimeRequest {
        name,
        queues: vec![queue.to_owned()],
        labels: Default::default(),
        max_concurrency,
    };
    let answer = client
        .worker()
        .register_runtime(request)
        .await?
        .into_inner();
    let client = match answer.runtime_token.as_str() {
        "" => client.clone(),
        token => client.with_token(token)?,
    };
    Ok(Registered {
        id: answer.runtime.context("no runtime in the answer")?.id,
        client,
    })
}

/// Heartbeats `runtimes` every 10 s, as their daemons would (a runtime that only claims goes
/// OFFLINE after `--offline-after`, and the sweeper then fails what it holds). Stops when the
/// returned guard drops.
pub(super) fn keep_alive(runtimes: Vec<Registered>) -> HeartbeatGuard {
    HeartbeatGuard(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            for runtime in &runtimes {
                let request = pb::HeartbeatRequest {
                    runtime_id: runtime.id.clone(),
                };
                let _ = runtime.client.worker().heartbeat(request).await;
            }
        }
    }))
}

pub(super) struct HeartbeatGuard(tokio::task::JoinHandle<()>);

impl Drop for HeartbeatGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn task(queue: &str) -> pb::EnqueueTaskRequest {
    pb::EnqueueTaskRequest {
        queue: queue.to_owned(),
        payload: vec![7; 256],
        ..Default::default()
    }
}

/// `count` tasks with single `EnqueueTask` calls from `producers` concurrent producers.
pub(super) async fn enqueue_singly(
    client: &Client,
    queue: &str,
    count: usize,
    producers: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let left = Arc::new(AtomicUsize::new(count));
    try_join_all((0..producers).map(|_| {
        let (mut tasks, left) = (client.tasks(), left.clone());
        async move {
            while take_one(&left) {
                tasks.enqueue_task(task(queue)).await?;
            }
            anyhow::Ok(())
        }
    }))
    .await?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// `count` tasks with `EnqueueTasks` batches from `producers` concurrent producers.
pub(super) async fn enqueue_in_batches(
    client: &Client,
    queue: &str,
    count: usize,
    producers: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let left = Arc::new(AtomicUsize::new(count));
    try_join_all((0..producers).map(|_| {
        let (mut tasks, left) = (client.tasks(), left.clone());
        async move {
            loop {
                let size = take_up_to(&left, ENQUEUE_BATCH);
                if size == 0 {
                    return anyhow::Ok(());
                }
                let requests = (0..size).map(|_| task(queue)).collect();
                let answer = tasks
                    .enqueue_tasks(pb::EnqueueTasksRequest { requests })
                    .await?;
                let stored = answer
                    .into_inner()
                    .results
                    .iter()
                    .filter(|result| result.error.is_none())
                    .count();
                anyhow::ensure!(stored == size, "a batch item was rejected");
            }
        }
    }))
    .await?;
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

fn take_one(left: &AtomicUsize) -> bool {
    take_up_to(left, 1) == 1
}

fn take_up_to(left: &AtomicUsize, most: usize) -> usize {
    let mut taken = 0;
    let _ = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
        taken = now.min(most);
        Some(now - taken)
    });
    taken
}

pub(super) struct Throughput {
    pub(super) tasks_per_second: f64,
    pub(super) claim_latency: Latencies,
}

/// `workers` runtimes, each claim → start → complete with unary calls until the queue is empty.
pub(super) async fn lifecycle_unary(
    client: &Client,
    queue: &str,
    workers: usize,
) -> anyhow::Result<Throughput> {
    let mut runtimes = Vec::new();
    for index in 0..workers {
        runtimes.push(register_worker(client, format!("{queue}-{index}"), queue).await?);
    }
    let _alive = keep_alive(runtimes.clone());
    let started = Instant::now();
    let done = AtomicUsize::new(0);
    let latencies = try_join_all(runtimes.into_iter().map(|runtime| {
        let done = &done;
        async move {
            let Registered {
                id: runtime_id,
                client,
            } = runtime;
            let client = &client;
            let mut worker = client.worker();
            let mut latencies = Vec::new();
            loop {
                let asked = Instant::now();
                let request = pb::ClaimTaskRequest {
                    runtime_id: runtime_id.clone(),
                    max_tasks: Some(1),
                    wait: None,
                };
                let claimed = worker.claim_task(request).await?.into_inner().tasks;
                latencies.push(asked.elapsed());
                let Some(claimed) = claimed.into_iter().next() else {
                    return anyhow::Ok(latencies);
                };
                start_and_complete(client, claimed).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }))
    .await?;
    let elapsed = started.elapsed();
    Ok(Throughput {
        tasks_per_second: done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        claim_latency: Latencies::new(latencies.into_iter().flatten().collect()),
    })
}

async fn start_and_complete(client: &Client, claimed: pb::ClaimedTask) -> anyhow::Result<()> {
    let task = claimed.task.context("a claim without its task")?;
    let task_id = task.id;
    let mut worker = client.worker();
    // An auto-started claim arrives RUNNING: no StartTask.
    if task.status != pb::TaskStatus::Running as i32 {
        let start = pb::StartTaskRequest {
            task_id: task_id.clone(),
            claim_token: claimed.claim_token.clone(),
        };
        worker.start_task(start).await?;
    }
    let complete = pb::CompleteTaskRequest {
        task_id,
        claim_token: claimed.claim_token,
        result: Vec::new(),
    };
    worker.complete_task(complete).await?;
    Ok(())
}

/// A claim stream of one runtime: its outbound half and its inbound messages.
struct Stream {
    outbound: mpsc::Sender<pb::StreamClaimsRequest>,
    inbound: tonic::Streaming<pb::StreamClaimsResponse>,
}

impl Stream {
    async fn open(
        client: &Client,
        runtime_id: String,
        credits: u32,
        auto_start: bool,
    ) -> anyhow::Result<Stream> {
        let (outbound, requests) = mpsc::channel(64);
        let open = Outbound::Open(pb::OpenStream {
            runtime_id,
            credits,
            auto_start,
        });
        outbound
            .send(pb::StreamClaimsRequest { msg: Some(open) })
            .await?;
        let inbound = client
            .worker()
            .stream_claims(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok(Stream { outbound, inbound })
    }

    /// The next claim pushed; `None` when the stream ended.
    async fn next_claim(&mut self) -> anyhow::Result<Option<pb::ClaimedTask>> {
        while let Some(message) = self.inbound.message().await? {
            if let Some(Inbound::Claimed(claimed)) = message.msg {
                return Ok(Some(claimed));
            }
        }
        Ok(None)
    }
}

/// `workers` runtimes, each with an auto-starting claim stream of `credits`, completing every
/// pushed claim on the stream itself (`StreamWrite`, its credit granted along) until `total`
/// tasks are done: one message each way per task, no call.
pub(super) async fn lifecycle_stream_writes(
    client: &Client,
    queue: &str,
    workers: usize,
    credits: u32,
    total: usize,
) -> anyhow::Result<f64> {
    streamed_lifecycle(
        client,
        queue,
        workers,
        total,
        move |runtime: Registered, progress: Progress| async move {
            let mut stream = Stream::open(&runtime.client, runtime.id, credits, true).await?;
            let mut request_id = 0;
            loop {
                let message = tokio::select! {
                    () = progress.finished.cancelled() => break,
                    message = stream.inbound.message() => message?,
                };
                match message.and_then(|message| message.msg) {
                    None => break,
                    Some(Inbound::Claimed(claimed)) => {
                        request_id += 1;
                        let write = complete_on_stream(request_id, claimed)?;
                        stream.outbound.send(write).await?;
                    }
                    Some(Inbound::Written(written)) => {
                        if let Some(error) = written.error {
                            anyhow::bail!("a write on the stream was refused: {}", error.message);
                        }
                        progress.task_done();
                    }
                    Some(_) => {}
                }
            }
            anyhow::Ok(())
        },
    )
    .await
}

/// CompleteTask for an auto-started claim, as a write on its stream that also grants its credit.
fn complete_on_stream(
    request_id: u64,
    claimed: pb::ClaimedTask,
) -> anyhow::Result<pb::StreamClaimsRequest> {
    let task = claimed.task.context("a claim without its task")?;
    let complete = pb::CompleteTaskRequest {
        task_id: task.id,
        claim_token: claimed.claim_token,
        result: Vec::new(),
    };
    let write = pb::StreamWrite {
        request_id,
        call: Some(pb::stream_write::Call::Complete(complete)),
        credit: 1,
    };
    Ok(pb::StreamClaimsRequest {
        msg: Some(Outbound::Write(write)),
    })
}

fn credit(n: u32) -> pb::StreamClaimsRequest {
    pb::StreamClaimsRequest {
        msg: Some(Outbound::Credit(pb::GrantCredit { n })),
    }
}

/// `workers` runtimes, each with a claim stream of `credits`; every pushed claim is started and
/// completed concurrently, and its credit granted back, until `total` tasks are done. With
/// `auto_start`, the streams ask for their claims started (no StartTask).
pub(super) async fn lifecycle_stream(
    client: &Client,
    queue: &str,
    workers: usize,
    credits: u32,
    total: usize,
    auto_start: bool,
) -> anyhow::Result<f64> {
    streamed_lifecycle(
        client,
        queue,
        workers,
        total,
        move |runtime: Registered, progress: Progress| async move {
            let mut stream = Stream::open(&runtime.client, runtime.id, credits, auto_start).await?;
            let mut in_flight = tokio::task::JoinSet::new();
            loop {
                let claimed = tokio::select! {
                    () = progress.finished.cancelled() => break,
                    claimed = stream.next_claim() => claimed?,
                };
                let Some(claimed) = claimed else { break };
                let (client, progress) = (runtime.client.clone(), progress.clone());
                let outbound = stream.outbound.clone();
                in_flight.spawn(async move {
                    start_and_complete(&client, claimed).await?;
                    progress.task_done();
                    let _ = outbound.send(credit(1)).await;
                    anyhow::Ok(())
                });
            }
            while let Some(result) = in_flight.join_next().await {
                result??;
            }
            anyhow::Ok(())
        },
    )
    .await
}

/// How far a streamed lifecycle got, shared by its sessions.
#[derive(Clone)]
struct Progress {
    done: Arc<AtomicUsize>,
    total: usize,
    /// Level-triggered: a session busy elsewhere when the last task finishes still sees it.
    finished: CancellationToken,
}

impl Progress {
    fn task_done(&self) {
        if self.done.fetch_add(1, Ordering::SeqCst) + 1 >= self.total {
            self.finished.cancel();
        }
    }
}

/// Registers `workers` runtimes (heartbeating), runs `session` for each until `total` tasks
/// are done, and answers the tasks per second from the first session's start.
async fn streamed_lifecycle<Session, Ends>(
    client: &Client,
    queue: &str,
    workers: usize,
    total: usize,
    session: Session,
) -> anyhow::Result<f64>
where
    Session: Fn(Registered, Progress) -> Ends,
    Ends: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut runtimes = Vec::new();
    for index in 0..workers {
        runtimes.push(register_worker(client, format!("{queue}-{index}"), queue).await?);
    }
    let _alive = keep_alive(runtimes.clone());
    let started = Instant::now();
    let progress = Progress {
        done: Arc::new(AtomicUsize::new(0)),
        total,
        finished: CancellationToken::new(),
    };
    let sessions: Vec<_> = runtimes
        .into_iter()
        .map(|runtime| tokio::spawn(session(runtime, progress.clone())))
        .collect();
    while progress.done.load(Ordering::SeqCst) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    progress.finished.cancel();
    for session in sessions {
        session.await??;
    }
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// Idle streams wait on `stream_side`; tasks are enqueued one at a time on `enqueue_side`.
/// Each sample is the time from the enqueue call to the `claimed` push.
pub(super) async fn wakeup(
    enqueue_side: &Client,
    stream_side: &Client,
    queue: &str,
    streams: usize,
    samples: usize,
) -> anyhow::Result<Wakeups> {
    let (claims, mut pushed) = mpsc::channel::<Instant>(16);
    let (settled, mut idle_again) = mpsc::channel::<()>(16);
    let mut sessions = Vec::new();
    for index in 0..streams {
        let runtime_id = register(stream_side, format!("wake-{queue}-{index}"), queue).await?;
        let mut stream = Stream::open(stream_side, runtime_id, 1, false).await?;
        let (client, claims, settled) = (stream_side.clone(), claims.clone(), settled.clone());
        sessions.push(tokio::spawn(async move {
            while let Some(claimed) = stream.next_claim().await? {
                if claims.send(Instant::now()).await.is_err() {
                    break;
                }
                start_and_complete(&client, claimed).await?;
                stream.outbound.send(credit(1)).await?;
                let _ = settled.send(()).await;
            }
            anyhow::Ok(())
        }));
    }
    // Let every stream reach its idle wait before the first sample.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut latencies = Vec::with_capacity(samples);
    let mut enqueue_calls = Vec::with_capacity(samples);
    let mut tasks = enqueue_side.tasks();
    for _ in 0..samples {
        let sent = Instant::now();
        tasks.enqueue_task(task(queue)).await?;
        enqueue_calls.push(sent.elapsed());
        let claimed = tokio::time::timeout(Duration::from_secs(30), pushed.recv())
            .await
            .context("no stream was woken within 30 s")?
            .context("the streams ended")?;
        latencies.push(claimed.duration_since(sent));
        // Each sample starts from idle: the stream that got the task has completed it and
        // granted its credit again, and the wake-ups that completion caused have died down.
        idle_again.recv().await.context("the streams ended")?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for session in sessions {
        session.abort();
    }
    Ok(Wakeups {
        claimed: Latencies::new(latencies),
        enqueue_call: Latencies::new(enqueue_calls),
    })
}

/// Enqueue-call → `claimed` push, and the enqueue call alone (the part a wake-up cannot
/// shorten).
pub(super) struct Wakeups {
    pub(super) claimed: Latencies,
    pub(super) enqueue_call: Latencies,
}

/// `runtimes` runtimes each claiming (unary, nothing claimable) once a second for `window`, at
/// least once each. Returns how many claims were made.
pub(super) async fn idle_unary_claims(
    client: &Client,
    queue: &str,
    runtimes: &[String],
    window: Duration,
) -> anyhow::Result<usize> {
    let claims = AtomicUsize::new(0);
    let until = Instant::now() + window;
    let spread = window.min(Duration::from_secs(1)).as_millis().max(1) as u64;
    try_join_all(runtimes.iter().enumerate().map(|(index, runtime_id)| {
        let claims = &claims;
        async move {
            let mut worker = client.worker();
            // Spread the runtimes over the second, as independent daemons would be.
            tokio::time::sleep(Duration::from_millis(index as u64 % spread)).await;
            loop {
                let request = pb::ClaimTaskRequest {
                    runtime_id: runtime_id.clone(),
                    max_tasks: Some(1),
                    wait: None,
                };
                let claimed = worker.claim_task(request).await?.into_inner().tasks;
                anyhow::ensure!(claimed.is_empty(), "the idle queue {queue} had work");
                claims.fetch_add(1, Ordering::Relaxed);
                if Instant::now() + Duration::from_secs(1) >= until {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }))
    .await?;
    Ok(claims.load(Ordering::Relaxed))
}

/// Opens one idle stream per runtime and keeps them open until the returned handles drop.
/// The most streams the bench opens on one connection: the server takes 256 per connection
/// (`MAX_STREAMS_PER_CONNECTION`, spec §10) and holds further ones back.
const STREAMS_PER_CONNECTION: usize = 200;

/// One idle stream per runtime, spread over connections `connect` opens.
pub(super) async fn open_idle_streams(
    connect: impl Fn() -> anyhow::Result<Client>,
    runtimes: &[String],
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut held = Vec::new();
    for share in runtimes.chunks(STREAMS_PER_CONNECTION) {
        let client = connect()?;
        for runtime_id in share {
            held.push(idle_stream(&client, runtime_id).await?);
        }
    }
    Ok(held)
}

/// A stream with one credit that waits for a claim it never gets.
async fn idle_stream(
    client: &Client,
    runtime_id: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut stream = Stream::open(client, runtime_id.to_owned(), 1, false).await?;
    Ok(tokio::spawn(async move {
        let _ = stream.next_claim().await;
        drop(stream.outbound);
    }))
}
