//! The worker when things go wrong: lost answers, refusals, superseded claims, a server that
//! restarts or forgets it, revoked credentials, a server that keeps refusing a final report.

use super::*;

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
    a_lost_start_answer_is_retried_with_the_same_token,
    when_both_start_answers_are_lost_the_task_status_decides,
    a_start_that_keeps_failing_fails_the_task_with_its_token,
    a_transient_error_on_complete_is_retried_and_never_becomes_a_failure,
    a_superseded_claim_is_dropped_without_failing_the_task,
    the_worker_survives_a_server_restart_mid_stream,
    the_worker_works_with_its_runtime_token_and_stops_when_it_is_revoked,
    a_finished_task_is_reported_however_long_the_server_refuses,
);
