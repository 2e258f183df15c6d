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

async fn the_worker_runs_each_task_once_and_reports_result_and_usage(backend: Backend) {
    let server = backend.start().await;
    let faults = six_tasks_complete_once(&server, quick_config(ClaimMode::Stream)).await;
    assert_eq!(faults.calls("RecoverOrphans"), 1);
    assert_eq!(faults.calls("StartTask"), 6);
    assert_eq!(
        faults.calls("ReportUsage"),
        6,
        "usage is reported once per task"
    );
    assert_eq!(faults.calls("FailTask"), 0);
    assert_eq!(faults.calls("DeregisterRuntime"), 1);
    assert_eq!(runtime_status(&server).await, pb::RuntimeStatus::Offline);
}

/// With `auto_start`, streamed claims arrive started: the worker sends no StartTask, and each
/// task still completes once with its result.
async fn an_auto_starting_worker_sends_no_start(backend: Backend) {
    let server = backend.start().await;
    let config = quick_config(ClaimMode::Stream).auto_start(true);
    let faults = six_tasks_complete_once(&server, config).await;
    assert_eq!(faults.calls("StartTask"), 0);
    assert_eq!(faults.calls("CompleteTask"), 6);
    assert_eq!(faults.calls("FailTask"), 0);
}

async fn the_worker_claims_only_into_free_slots(backend: Backend) {
    let server = backend.start().await;
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let handler = TestHandler::new(move |task, _| {
        let gate = held.clone();
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            Ok(task.payload)
        })
    });
    let config = quick_config(ClaimMode::Stream).concurrency(1);
    let worker = RunningWorker::spawn(
        Client::from_channel(server.channel.clone()),
        config,
        handler,
    );
    let first = enqueue_payload(&server, "first").await;
    let second = enqueue_payload(&server, "second").await;
    wait_for_status(&server, &first.id, pb::TaskStatus::Running).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting = server.get_task(&second.id).await;
    assert_eq!(
        status_of(&waiting),
        pb::TaskStatus::Queued,
        "one slot, one claim"
    );
    gate.add_permits(2);
    wait_for_status(&server, &second.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
}

async fn a_cancellation_reaches_the_running_handler(server: TestServer, mode: ClaimMode) {
    let faults = Faults::default();
    let seen = Arc::new(AtomicUsize::new(0));
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(mode),
        until_cancelled(seen.clone()),
    );
    let task = enqueue_payload(&server, "long").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Running).await;
    server.cancel(&task.id).await;
    wait_for_cancellation(&seen).await;
    worker.stop().await;
    assert_eq!(
        faults.calls("FailTask"),
        0,
        "a cancelled task is not failed"
    );
    assert_eq!(faults.calls("CompleteTask"), 0);
    assert_eq!(
        status_of(&server.get_task(&task.id).await),
        pb::TaskStatus::Cancelled
    );
}

async fn a_stream_cancellation_reaches_the_running_handler(backend: Backend) {
    a_cancellation_reaches_the_running_handler(backend.start().await, ClaimMode::Stream).await;
}

async fn a_polled_cancellation_reaches_the_running_handler(backend: Backend) {
    a_cancellation_reaches_the_running_handler(backend.start().await, ClaimMode::Unary).await;
}

async fn a_lost_start_answer_is_retried_with_the_same_token(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    faults.inject("StartTask", Fault::LoseAnswer);
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        TestHandler::echo(),
    );
    let task = enqueue_payload(&server, "once").await;
    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
    assert_eq!(done.attempt, 1);
    assert_eq!(
        faults.calls("StartTask"),
        2,
        "one retry, with the same token"
    );
    assert_eq!(faults.calls("FailTask"), 0);
}

async fn when_both_start_answers_are_lost_the_task_status_decides(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    faults.inject("StartTask", Fault::LoseAnswer);
    faults.inject("StartTask", Fault::LoseAnswer);
    let handler = TestHandler::echo();
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler.clone(),
    );
    let task = enqueue_payload(&server, "started anyway").await;
    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
    assert_eq!(faults.calls("StartTask"), 2);
    assert_eq!(
        faults.calls("GetTaskStatus"),
        1,
        "RUNNING at our attempt: the start landed"
    );
    assert_eq!(faults.calls("FailTask"), 0);
    assert_eq!(handler.attempts_run(), vec![1]);
    assert_eq!(done.result, b"started anyway");
}

async fn a_start_that_keeps_failing_fails_the_task_with_its_token(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    // Neither start reaches the server, so the task is still DISPATCHED, not RUNNING.
    faults.inject("StartTask", Fault::Refuse(Code::Unavailable));
    faults.inject("StartTask", Fault::Refuse(Code::Unavailable));
    let handler = TestHandler::echo();
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler.clone(),
    );
    let task = enqueue_payload(&server, "unlucky").await;
    let retried = wait_for_task(&server, &task.id, |task| {
        task.attempt == 2 || status_of(task) == pb::TaskStatus::Completed
    })
    .await;
    worker.stop().await;
    assert_eq!(faults.calls("FailTask"), 1);
    assert!(retried.error.contains("StartTask failed"), "{retried:?}");
    assert!(!handler.attempts_run().contains(&1), "attempt 1 never ran");
}

async fn a_transient_error_on_complete_is_retried_and_never_becomes_a_failure(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    faults.inject("CompleteTask", Fault::Refuse(Code::Unavailable));
    faults.inject("CompleteTask", Fault::LoseAnswer);
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        TestHandler::echo(),
    );
    let task = enqueue_payload(&server, "worth keeping").await;
    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    // The replay after the lost answer must be answered with success, not counted as a failure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    worker.stop().await;
    assert_eq!(faults.calls("CompleteTask"), 3);
    assert_eq!(faults.calls("FailTask"), 0);
    assert_eq!(done.result, b"worth keeping");
}

async fn a_superseded_claim_is_dropped_without_failing_the_task(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let handler = TestHandler::echo().preparing(move |task, _| {
        let gate = held.clone();
        Box::pin(async move {
            if task.attempt == 1 {
                gate.acquire().await.unwrap().forget();
            }
            Ok(Vec::new())
        })
    });
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler.clone(),
    );
    let task = enqueue_payload(&server, "contested").await;
    let claimed = wait_for_status(&server, &task.id, pb::TaskStatus::Dispatched).await;
    // While attempt 1 prepares, its claim is superseded: the task is failed and retried.
    let recovered = server
        .worker
        .clone()
        .recover_orphans(pb::RecoverOrphansRequest {
            runtime_id: claimed.claimed_by.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recovered.retried, 1);
    gate.add_permits(1);
    let done = wait_for_task(&server, &task.id, |task| {
        status_of(task) == pb::TaskStatus::Completed
    })
    .await;
    worker.stop().await;
    assert_eq!(done.attempt, 2);
    assert_eq!(
        handler.attempts_run(),
        vec![2],
        "the superseded attempt never ran"
    );
    assert_eq!(
        faults.calls("FailTask"),
        0,
        "a lost claim is dropped, not failed"
    );
}

async fn a_long_prepare_keeps_its_lease(backend: Backend) {
    let server = backend
        .start_with(|config| config.lease_duration = Duration::from_millis(300))
        .await;
    let faults = Faults::default();
    let handler = TestHandler::echo().preparing(|_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(Vec::new())
        })
    });
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler,
    );
    let task = enqueue_payload(&server, "slow start").await;
    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
    assert_eq!(done.attempt, 1);
    assert_eq!(done.lease_expirations, 0);
    assert!(
        faults.calls("ExtendLease") >= 2,
        "{} extensions",
        faults.calls("ExtendLease")
    );
}

async fn shutdown_lets_in_flight_tasks_finish_then_deregisters(backend: Backend) {
    let server = backend.start().await;
    let handler = TestHandler::new(|task, _| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok(task.payload)
        })
    });
    let worker = RunningWorker::spawn(
        Client::from_channel(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler,
    );
    let task = enqueue_payload(&server, "finish me").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Running).await;
    worker.stop().await;
    assert_eq!(
        status_of(&server.get_task(&task.id).await),
        pb::TaskStatus::Completed
    );
    assert_eq!(runtime_status(&server).await, pb::RuntimeStatus::Offline);
}

async fn past_the_grace_in_flight_tasks_are_failed_for_a_retry(backend: Backend) {
    let server = backend.start().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let config = quick_config(ClaimMode::Stream).shutdown_grace(Duration::from_millis(200));
    let worker = RunningWorker::spawn(
        Client::from_channel(server.channel.clone()),
        config,
        until_cancelled(seen.clone()),
    );
    let task = enqueue_payload(&server, "never ends").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Running).await;
    worker.stop().await;
    assert_eq!(seen.load(Ordering::SeqCst), 1, "the handler was cancelled");
    let retried = server.get_task(&task.id).await;
    assert_eq!(status_of(&retried), pb::TaskStatus::Queued);
    assert_eq!(retried.attempt, 2);
    assert!(retried.error.contains("shutdown"), "{retried:?}");
}

async fn the_worker_survives_a_server_restart_mid_stream(backend: Backend) {
    let server = backend.start().await;
    let client = Client::connect(format!("http://{}", server.address)).unwrap();
    let worker = RunningWorker::spawn(client, quick_config(ClaimMode::Stream), TestHandler::echo());
    let before = enqueue_payload(&server, "before").await;
    wait_for_status(&server, &before.id, pb::TaskStatus::Completed).await;
    let server = server.restart().await;
    let after = enqueue_payload(&server, "after").await;
    wait_for_status(&server, &after.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
}

#[tokio::test]
async fn the_worker_registers_again_when_the_server_forgot_it() {
    // The embedded store starts empty after a restart: the runtime is unknown there.
    let server = Backend::Memory.start().await;
    let client = Client::connect(format!("http://{}", server.address)).unwrap();
    let worker = RunningWorker::spawn(client, quick_config(ClaimMode::Stream), TestHandler::echo());
    wait_until_registered(&server).await;
    let server = server.restart().await;
    let task = enqueue_payload(&server, "after amnesia").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
}

async fn wait_until_registered(server: &TestServer) {
    for _ in 0..500 {
        if !server.runtimes(None).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker never registered");
}

async fn orphans_of_an_earlier_life_are_recovered_at_start(backend: Backend) {
    let server = backend.start().await;
    // The same runtime, before a crash: it claimed a task and never finished it.
    let runtime_id = server.register(WORKER_NAME, &[QUEUE]).await;
    let task = enqueue_payload(&server, "orphaned").await;
    server.claim_one(&runtime_id).await;
    let handler = TestHandler::echo();
    let worker = RunningWorker::spawn(
        Client::from_channel(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        handler.clone(),
    );
    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
    assert_eq!(
        done.attempt, 2,
        "attempt 1 was failed as RUNTIME_RECOVERY and retried"
    );
    assert_eq!(handler.attempts_run(), vec![2]);
}

async fn without_streaming_the_worker_falls_back_to_long_poll(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    faults.inject("StreamClaims", Fault::Refuse(Code::Unimplemented));
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        TestHandler::echo(),
    );
    let task = enqueue_payload(&server, "polled").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;
    worker.stop().await;
    assert_eq!(
        faults.calls("StreamClaims"),
        1,
        "no second stream after UNIMPLEMENTED"
    );
    assert!(faults.calls("ClaimTask") >= 1);
}

async fn the_worker_heartbeats_at_the_interval_the_server_gave(backend: Backend) {
    let server = backend
        .start_with(|config| {
            config.heartbeat_interval = Duration::from_millis(100);
        })
        .await;
    let faults = Faults::default();
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        quick_config(ClaimMode::Stream),
        TestHandler::echo(),
    );
    wait_until("five heartbeats were sent", || {
        faults.calls("Heartbeat") >= 5
    })
    .await;
    worker.stop().await;
    assert_eq!(faults.calls("RegisterRuntime"), 1);
}

/// PostgreSQL only: the server restarts, and the embedded store forgets everything then.
#[sqlx::test]
async fn cancellations_arrive_after_a_reconnect_even_when_every_slot_is_busy(
    pool: sqlx::postgres::PgPoolOptions,
    connect: sqlx::postgres::PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    let client = Client::connect(format!("http://{}", server.address)).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let config = quick_config(ClaimMode::Stream).concurrency(1);
    let worker = RunningWorker::spawn(client, config, until_cancelled(seen.clone()));
    let task = enqueue_payload(&server, "long").await;
    wait_for_status(&server, &task.id, pb::TaskStatus::Running).await;
    // The claim stream breaks while the only slot is busy; the worker must reopen it anyway.
    let server = server.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.cancel(&task.id).await;
    wait_for_cancellation(&seen).await;
    worker.stop().await;
}

/// With `--auth token`: the worker registers with an API key that may only register, then
/// works with the runtime token its registration returned. When another daemon registers the
/// same name, the token is revoked: the worker stops claiming and its run ends by itself.
async fn the_worker_works_with_its_runtime_token_and_stops_when_it_is_revoked(backend: Backend) {
    use crate::auth::{ADMIN, As, admin_token_file, with_tokens};
    let file = admin_token_file(ADMIN);
    let server = backend.start_with(with_tokens(file)).await;
    let admin = As::token(&server, ADMIN);
    let register_only = admin.create_key(&["register"]).await;
    let client = Client::from_channel(server.channel.clone())
        .with_token(&register_only)
        .unwrap();
    let worker = RunningWorker::spawn(client, quick_config(ClaimMode::Stream), TestHandler::echo());

    let task = admin.enqueue(QUEUE).await.unwrap();
    let done = wait_for_as(&admin, &task.id, pb::TaskStatus::Completed).await;
    assert_eq!(done.attempt, 1);

    // Another daemon takes the name.
    admin.register(WORKER_NAME, &[QUEUE]).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), worker.handle).await;
    assert!(
        ended.is_ok(),
        "the worker kept running with a revoked token"
    );
    let later = admin.enqueue(QUEUE).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let untouched = admin
        .tasks
        .clone()
        .get_task(pb::GetTaskRequest { task_id: later.id })
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    assert_eq!(status_of(&untouched), pb::TaskStatus::Queued);
}

async fn wait_for_as(client: &crate::auth::As, task_id: &str, status: pb::TaskStatus) -> pb::Task {
    for _ in 0..500 {
        let task = client
            .tasks
            .clone()
            .get_task(pb::GetTaskRequest {
                task_id: task_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        if status_of(&task) == status {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("task {task_id} never became {status:?}");
}

/// A finished task's report outlasts every refusal the server may answer while it recovers
/// (UNAVAILABLE, ABORTED, OVERLOADED), also past the report deadline: it is never given up.
async fn a_finished_task_is_reported_however_long_the_server_refuses(backend: Backend) {
    let server = backend.start().await;
    let faults = Faults::default();
    for code in [
        Code::Unavailable,
        Code::Aborted,
        Code::ResourceExhausted,
        Code::Unavailable,
        Code::Unavailable,
        Code::Unavailable,
    ] {
        faults.inject("CompleteTask", Fault::Refuse(code));
    }
    let mut config = quick_config(ClaimMode::Stream);
    config.report_deadline = Duration::from_millis(50);
    let worker = RunningWorker::spawn(
        faults.client(server.channel.clone()),
        config,
        TestHandler::echo(),
    );
    let task = enqueue_payload(&server, "persistent").await;

    let done = wait_for_status(&server, &task.id, pb::TaskStatus::Completed).await;

    worker.stop().await;
    assert_eq!(done.attempt, 1);
    assert_eq!(faults.calls("CompleteTask"), 7);
}

conformance!(
    the_worker_runs_each_task_once_and_reports_result_and_usage,
    an_auto_starting_worker_sends_no_start,
    the_worker_claims_only_into_free_slots,
    a_stream_cancellation_reaches_the_running_handler,
    a_polled_cancellation_reaches_the_running_handler,
    a_lost_start_answer_is_retried_with_the_same_token,
    when_both_start_answers_are_lost_the_task_status_decides,
    a_start_that_keeps_failing_fails_the_task_with_its_token,
    a_transient_error_on_complete_is_retried_and_never_becomes_a_failure,
    a_superseded_claim_is_dropped_without_failing_the_task,
    a_long_prepare_keeps_its_lease,
    shutdown_lets_in_flight_tasks_finish_then_deregisters,
    past_the_grace_in_flight_tasks_are_failed_for_a_retry,
    the_worker_survives_a_server_restart_mid_stream,
    orphans_of_an_earlier_life_are_recovered_at_start,
    without_streaming_the_worker_falls_back_to_long_poll,
    the_worker_heartbeats_at_the_interval_the_server_gave,
    the_worker_works_with_its_runtime_token_and_stops_when_it_is_revoked,
    a_finished_task_is_reported_however_long_the_server_refuses,
);
