//! The worker at work: each task run once with its result and usage, slots, cancellations,
//! prepare and its lease, shutdown and its grace, heartbeats, the long-poll fallback.

use super::*;

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

/// `writes_on_stream`: finished tasks are reported on the claim stream, not by a call each.
async fn a_worker_writing_on_the_stream_makes_no_report_calls(backend: Backend) {
    let server = backend.start().await;
    let config = quick_config(ClaimMode::Stream)
        .auto_start(true)
        .writes_on_stream(true);
    let faults = six_tasks_complete_once(&server, config).await;
    assert_eq!(faults.calls("StartTask"), 0);
    assert_eq!(
        faults.calls("CompleteTask"),
        0,
        "completes went on the stream"
    );
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

/// The prepare outlasts two leases, so only the extensions keep it. The lease leaves the
/// worker's timer (an extension every third of it) 600 ms of slack: with 300 ms a debug build
/// on a loaded CI machine once missed a 200 ms window.
async fn a_long_prepare_keeps_its_lease(backend: Backend) {
    let server = backend
        .start_with(|config| config.lease_duration = Duration::from_millis(900))
        .await;
    let faults = Faults::default();
    let handler = TestHandler::echo().preparing(|_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(2)).await;
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

conformance!(
    the_worker_runs_each_task_once_and_reports_result_and_usage,
    an_auto_starting_worker_sends_no_start,
    a_worker_writing_on_the_stream_makes_no_report_calls,
    the_worker_claims_only_into_free_slots,
    a_stream_cancellation_reaches_the_running_handler,
    a_polled_cancellation_reaches_the_running_handler,
    a_long_prepare_keeps_its_lease,
    shutdown_lets_in_flight_tasks_finish_then_deregisters,
    past_the_grace_in_flight_tasks_are_failed_for_a_retry,
    orphans_of_an_earlier_life_are_recovered_at_start,
    without_streaming_the_worker_falls_back_to_long_poll,
    the_worker_heartbeats_at_the_interval_the_server_gave,
);
