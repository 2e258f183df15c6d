//! The Rust worker SDK (`leasehold::client::Worker`) against a real server, with the faults each
//! daemon rule handles injected into the client's own transport: every call still goes over
//! real gRPC to a real server; the transport only loses answers or refuses calls on cue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use leasehold::client::{
    ClaimMode, Client, Handler, TaskContext, TaskError, TransportError, Worker, WorkerConfig,
};
use leasehold::proto as pb;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::harness::{
    Backend, TestServer, status_of, task_in, wait_for_status, wait_for_task, wait_until,
};

const QUEUE: &str = "sdk";
const WORKER_NAME: &str = "sdk-worker";

/// What the transport does to the next call of one method.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The server handles the call but its answer is lost: the client sees UNAVAILABLE.
    LoseAnswer,
    /// The call never reaches the server: the client sees this code.
    Refuse(Code),
}

/// The faults still to inject, per method, and every call made, in order.
#[derive(Clone, Default)]
struct Faults {
    planned: Arc<Mutex<HashMap<String, VecDeque<Fault>>>>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl Faults {
    fn inject(&self, method: &str, fault: Fault) {
        let mut planned = self.planned.lock().unwrap();
        planned.entry(method.into()).or_default().push_back(fault);
    }

    fn calls(&self, method: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|call| *call == method).count()
    }

    /// Records a call of `method` and takes its next planned fault.
    fn on_call(&self, method: &str) -> Option<Fault> {
        self.calls.lock().unwrap().push(method.into());
        let mut planned = self.planned.lock().unwrap();
        planned.get_mut(method)?.pop_front()
    }

    fn client(&self, channel: Channel) -> Client {
        Client::from_transport(BoxCloneSyncService::new(FaultyTransport {
            channel,
            faults: self.clone(),
        }))
    }
}

#[derive(Clone)]
struct FaultyTransport {
    channel: Channel,
    faults: Faults,
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl tower::Service<HttpRequest> for FaultyTransport {
    type Response = HttpResponse;
    type Error = TransportError;
    type Future = BoxFuture<'static, Result<HttpResponse, TransportError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or("");
        let fault = self.faults.on_call(method);
        let channel = self.channel.clone();
        Box::pin(async move {
            if let Some(Fault::Refuse(code)) = fault {
                return Ok(Status::new(code, "injected fault").into_http());
            }
            // A unary answer's headers come after the server's handler returned, so once they
            // are here the call has taken effect.
            let answer = channel
                .oneshot(request)
                .await
                .map_err(|error| TransportError(error.into()))?;
            match fault {
                Some(Fault::LoseAnswer) => {
                    Ok(Status::unavailable("injected: answer lost").into_http())
                }
                _ => Ok(answer),
            }
        })
    }
}

type Step = Arc<
    dyn Fn(pb::Task, CancellationToken) -> BoxFuture<'static, Result<Vec<u8>, TaskError>>
        + Send
        + Sync,
>;

/// A handler made of closures, recording every attempt `run` began and every counter it set.
#[derive(Clone)]
struct TestHandler {
    prepare: Option<Step>,
    run: Step,
    runs: Arc<Mutex<Vec<(String, u32)>>>,
}

impl TestHandler {
    fn new(
        run: impl Fn(pb::Task, CancellationToken) -> BoxFuture<'static, Result<Vec<u8>, TaskError>>
        + Send
        + Sync
        + 'static,
    ) -> TestHandler {
        TestHandler {
            prepare: None,
            run: Arc::new(run),
            runs: Arc::default(),
        }
    }

    /// Completes every task with its payload.
    fn echo() -> TestHandler {
        TestHandler::new(|task, _| Box::pin(async move { Ok(task.payload) }))
    }

    fn preparing(
        mut self,
        prepare: impl Fn(pb::Task, CancellationToken) -> BoxFuture<'static, Result<Vec<u8>, TaskError>>
        + Send
        + Sync
        + 'static,
    ) -> TestHandler {
        self.prepare = Some(Arc::new(prepare));
        self
    }

    fn attempts_run(&self) -> Vec<u32> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .map(|(_, attempt)| *attempt)
            .collect()
    }
}

#[async_trait::async_trait]
impl Handler for TestHandler {
    async fn prepare(&self, task: &TaskContext) -> Result<(), TaskError> {
        match &self.prepare {
            Some(prepare) => prepare(task.task().clone(), task.cancelled().clone())
                .await
                .map(drop),
            None => Ok(()),
        }
    }

    async fn run(&self, task: &TaskContext) -> Result<Vec<u8>, TaskError> {
        let record = (task.task().id.clone(), task.task().attempt);
        self.runs.lock().unwrap().push(record);
        task.record_usage("runs", 1);
        (self.run)(task.task().clone(), task.cancelled().clone()).await
    }
}

/// Worker settings that make a test's timings short.
fn quick_config(mode: ClaimMode) -> WorkerConfig {
    let mut config = WorkerConfig::new(WORKER_NAME, [QUEUE])
        .concurrency(2)
        .claim_mode(mode)
        .shutdown_grace(Duration::from_secs(5));
    config.cancel_poll_interval = Duration::from_millis(50);
    config.long_poll_wait = Duration::from_secs(1);
    config.start_retry_pause = Duration::from_millis(20);
    config.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(200));
    config
}

struct RunningWorker {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), Status>>,
}

impl RunningWorker {
    fn spawn(client: Client, config: WorkerConfig, handler: TestHandler) -> RunningWorker {
        let shutdown = CancellationToken::new();
        let worker = Worker::new(client, config, handler);
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        RunningWorker { shutdown, handle }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
        stopped.expect("the worker stopped").unwrap().unwrap();
    }
}

async fn enqueue_payload(server: &TestServer, payload: &str) -> pb::Task {
    let mut request = task_in(QUEUE);
    request.payload = payload.as_bytes().to_vec();
    server.enqueue(request).await
}

/// A handler that blocks in `run` until its task is cancelled, counting the cancellations seen.
fn until_cancelled(seen: Arc<AtomicUsize>) -> TestHandler {
    TestHandler::new(move |_, cancelled| {
        let seen = seen.clone();
        Box::pin(async move {
            cancelled.cancelled().await;
            seen.fetch_add(1, Ordering::SeqCst);
            Err(TaskError::retryable("stopped"))
        })
    })
}

async fn wait_for_cancellation(seen: &AtomicUsize) {
    wait_until("the handler saw the cancellation", || {
        seen.load(Ordering::SeqCst) == 1
    })
    .await;
}

async fn runtime_status(server: &TestServer) -> pb::RuntimeStatus {
    let runtimes = server.runtimes(None).await;
    let runtime = runtimes
        .iter()
        .find(|runtime| runtime.name == WORKER_NAME)
        .unwrap();
    pb::RuntimeStatus::try_from(runtime.status).unwrap()
}

/// Six tasks through a worker configured as `config`: each completes once, on its first attempt,
/// with its payload echoed as its result. Returns the calls the worker made.
async fn six_tasks_complete_once(server: &TestServer, config: WorkerConfig) -> Faults {
    let faults = Faults::default();
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        config,
        TestHandler::echo(),
    );
    let mut tasks = Vec::new();
    for n in 0..6 {
        tasks.push(enqueue_payload(server, &format!("job {n}")).await);
    }
    for task in &tasks {
        let done = wait_for_status(server, &task.id, pb::TaskStatus::Completed).await;
        assert_eq!(done.result, task.payload);
        assert_eq!(done.attempt, 1);
        assert!(done.started_at.is_some());
    }
    worker.stop().await;
    faults
}

mod faults;
mod running;
