//! Bulk operations (docs/semantics.md "Bulk operations"): CancelTasks and RetryTasks by filter,
//! with a dry run that only counts, in batches, on both stores.

use leasehold::proto as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, status_of, task_in};

fn filter(queue: &str, statuses: &[pb::TaskStatus]) -> Option<pb::TaskFilter> {
    Some(pb::TaskFilter {
        queue: queue.into(),
        statuses: statuses.iter().map(|status| *status as i32).collect(),
        runtime_id: String::new(),
    })
}

async fn cancel_tasks(
    server: &TestServer,
    filter: Option<pb::TaskFilter>,
    dry_run: bool,
) -> (u64, u64) {
    let answer = server
        .tasks
        .clone()
        .cancel_tasks(pb::CancelTasksRequest { filter, dry_run })
        .await
        .expect("CancelTasks")
        .into_inner();
    (answer.matched, answer.changed)
}

async fn retry_tasks(
    server: &TestServer,
    filter: Option<pb::TaskFilter>,
    dry_run: bool,
) -> (u64, u64) {
    let answer = server
        .admin
        .clone()
        .retry_tasks(pb::RetryTasksRequest { filter, dry_run })
        .await
        .expect("RetryTasks")
        .into_inner();
    (answer.matched, answer.changed)
}

async fn status(server: &TestServer, task: &pb::Task) -> pb::TaskStatus {
    status_of(&server.get_task(&task.id).await)
}

/// A queue with one RUNNING, one COMPLETED and three QUEUED tasks, and another queue: a dry run
/// counts and changes nothing; the statuses narrow the count; the cancel takes the four active
/// tasks of this queue only, and the running task's holder can no longer complete it. Then a
/// redrive by filter brings the four back as new.
async fn cancel_and_retry_by_filter(backend: Backend) {
    use pb::TaskStatus::{Cancelled, Completed, Queued, Running};
    let server = backend.start().await;
    let runtime = server.register("bulk", &["q"]).await;
    let running = server.enqueue_to("q").await;
    let held = server.claim_one(&runtime).await;
    server.start_task(&held).await.unwrap();
    let completed = server.enqueue_to("q").await;
    let done = server.claim_one(&runtime).await;
    server.start_task(&done).await.unwrap();
    server.complete(&done, b"ok").await.unwrap();
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(server.enqueue_to("q").await);
    }
    let elsewhere = server.enqueue_to("other").await;

    assert_eq!(cancel_tasks(&server, filter("q", &[]), true).await, (4, 0));
    assert_eq!(status(&server, &running).await, Running);
    assert_eq!(
        cancel_tasks(&server, filter("q", &[Queued]), true).await,
        (3, 0)
    );
    assert_eq!(
        cancel_tasks(&server, filter("q", &[Completed]), true).await,
        (0, 0),
        "a finished task cannot be cancelled"
    );

    assert_eq!(cancel_tasks(&server, filter("q", &[]), false).await, (4, 4));
    for task in queued.iter().chain([&running]) {
        assert_eq!(status(&server, task).await, Cancelled);
    }
    assert_eq!(status(&server, &completed).await, Completed);
    assert_eq!(status(&server, &elsewhere).await, Queued);
    let late = server.complete(&held, b"late").await.unwrap_err();
    assert_error(&late, Code::FailedPrecondition, "TASK_CANCELLED");

    assert_eq!(
        retry_tasks(&server, filter("q", &[Cancelled]), true).await,
        (4, 0)
    );
    assert_eq!(retry_tasks(&server, filter("q", &[]), false).await, (4, 4));
    for task in queued.iter().chain([&running]) {
        let now = server.get_task(&task.id).await;
        assert_eq!((status_of(&now), now.attempt), (Queued, 1));
    }
    assert_eq!(status(&server, &completed).await, Completed);
}

/// More tasks than one batch: every one is counted and changed, and the queue's counts follow.
async fn bulk_operations_work_through_batches(backend: Backend) {
    let server = backend.start().await;
    let total = leasehold::coordinator::BULK_BATCH as usize * 2 + 500;
    for chunk in (0..total).collect::<Vec<_>>().chunks(1000) {
        let requests = chunk.iter().map(|_| task_in("many")).collect();
        server
            .tasks
            .clone()
            .enqueue_tasks(pb::EnqueueTasksRequest { requests })
            .await
            .unwrap();
    }
    let total = total as u64;
    assert_eq!(
        cancel_tasks(&server, filter("many", &[]), false).await,
        (total, total)
    );
    let counts = server.describe_queue("many").await.counts.unwrap();
    assert_eq!((counts.queued, counts.cancelled), (0, total));
    assert_eq!(
        retry_tasks(&server, filter("many", &[]), false).await,
        (total, total)
    );
    let counts = server.describe_queue("many").await.counts.unwrap();
    assert_eq!((counts.queued, counts.cancelled), (total, 0));
}

/// A bulk operation names its queue; a filter that is missing or has none is refused, typed.
async fn a_bulk_operation_needs_its_queue(backend: Backend) {
    let server = backend.start().await;
    for filter in [None, filter("", &[])] {
        let refused = server
            .tasks
            .clone()
            .cancel_tasks(pb::CancelTasksRequest {
                filter,
                dry_run: true,
            })
            .await
            .unwrap_err();
        assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
    }
    let refused = server
        .admin
        .clone()
        .retry_tasks(pb::RetryTasksRequest {
            filter: filter("not a queue!", &[]),
            dry_run: false,
        })
        .await
        .unwrap_err();
    assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
}

conformance!(
    cancel_and_retry_by_filter,
    bulk_operations_work_through_batches,
    a_bulk_operation_needs_its_queue,
);

/// Redriving many tasks the sweeper already counted takes each out of the finished-task
/// tally (one statement per batch subtracts per queue and status, not one per statement).
#[sqlx::test]
async fn a_bulk_redrive_keeps_the_finished_tally_exact(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    crate::retention::insert_history(&server, "hist", "FAILED", 30, "1 day").await;
    crate::retention::insert_history(&server, "hist", "CANCELLED", 20, "1 day").await;
    sqlx::query("UPDATE finished_tally_progress SET counted_through = now() - interval '30 days'")
        .execute(server.pool())
        .await
        .unwrap();
    server.sweep().await;
    let counts = server.describe_queue("hist").await.counts.unwrap();
    assert_eq!((counts.failed, counts.cancelled), (30, 20));

    assert_eq!(
        retry_tasks(&server, filter("hist", &[]), false).await,
        (50, 50)
    );
    let counts = server.describe_queue("hist").await.counts.unwrap();
    assert_eq!((counts.failed, counts.cancelled, counts.queued), (0, 0, 50));
}
