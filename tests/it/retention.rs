//! Operations over time (spec §11): finished tasks are deleted after `--retain-finished`, a
//! queue's execution-time default ends tasks that would otherwise run forever, and
//! DescribeQueue costs the same however much history the table holds.

use std::time::Duration;

use leasehold::proto as pb;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;

use crate::harness::{Backend, TestServer, assert_error, status_of, task_in, wire_millis};

const HOUR: Duration = Duration::from_secs(60 * 60);

/// A task taken through claim, start and complete by `runtime`, with a usage report.
async fn completed_task(server: &TestServer, runtime: &str, queue: &str) -> pb::Task {
    let task = server.enqueue_to(queue).await;
    let claimed = server.claim_one(runtime).await;
    server.start_task(&claimed).await.unwrap();
    server
        .worker
        .clone()
        .report_usage(pb::ReportUsageRequest {
            task_id: task.id.clone(),
            claim_token: claimed.claim_token.clone(),
            counters: [("tokens".to_string(), 3)].into_iter().collect(),
        })
        .await
        .unwrap();
    server.complete(&claimed, b"done").await.unwrap();
    task
}

async fn task_exists(server: &TestServer, task_id: &str) -> bool {
    let request = pb::GetTaskRequest {
        task_id: task_id.into(),
    };
    match server.tasks.clone().get_task(request).await {
        Ok(_) => true,
        Err(status) if status.code() == Code::NotFound => false,
        Err(status) => panic!("GetTask failed: {status:?}"),
    }
}

async fn finished_tasks_are_deleted_once_the_retention_passed(backend: Backend) {
    let server = backend
        .start_with(|config| config.retain_finished = HOUR)
        .await;
    let runtime = server.register("retained", &["q"]).await;
    let completed = completed_task(&server, &runtime, "q").await;
    let cancelled = server.enqueue_to("q").await;
    server.cancel(&cancelled.id).await;
    let queued = server.enqueue_to("q").await;

    server.advance_time(HOUR / 2).await;
    assert_eq!(server.sweep().await.deleted_finished, 0);
    assert!(task_exists(&server, &completed.id).await);

    server
        .advance_time(HOUR / 2 + Duration::from_secs(60))
        .await;
    assert_eq!(server.sweep().await.deleted_finished, 2);
    assert!(!task_exists(&server, &completed.id).await);
    assert!(!task_exists(&server, &cancelled.id).await);
    assert!(
        task_exists(&server, &queued.id).await,
        "only finished tasks go"
    );
    let counts = server.describe_queue("q").await.counts.unwrap();
    assert_eq!(
        (counts.queued, counts.completed, counts.cancelled),
        (1, 0, 0)
    );
    assert_eq!(server.sweep().await.deleted_finished, 0);
}

async fn a_zero_retention_keeps_finished_tasks_forever(backend: Backend) {
    let server = backend
        .start_with(|config| config.retain_finished = Duration::ZERO)
        .await;
    let runtime = server.register("forever", &["q"]).await;
    let completed = completed_task(&server, &runtime, "q").await;
    server.advance_time(HOUR * 24 * 400).await;
    assert_eq!(server.sweep().await.deleted_finished, 0);
    assert!(task_exists(&server, &completed.id).await);
}

async fn set_default_execution_timeout(
    server: &TestServer,
    queue: &str,
    timeout: prost_types::Duration,
) -> Result<pb::DescribeQueueResponse, tonic::Status> {
    server
        .admin
        .clone()
        .update_queue(pb::UpdateQueueRequest {
            queue: queue.into(),
            default_execution_timeout: Some(timeout),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn a_queue_default_execution_timeout_ends_tasks_without_their_own(backend: Backend) {
    let server = backend.start().await;
    let ten_minutes = wire_millis(10 * 60 * 1000);
    let updated = set_default_execution_timeout(&server, "slow", ten_minutes)
        .await
        .unwrap();
    assert_eq!(updated.default_execution_timeout, Some(ten_minutes));
    let described = server.describe_queue("slow").await;
    assert_eq!(described.default_execution_timeout, Some(ten_minutes));
    // Other settings are left as they were.
    let capped = server.update_queue("slow", Some(4), None).await;
    assert_eq!(capped.default_execution_timeout, Some(ten_minutes));

    let runtime = server.register("hung", &["slow"]).await;
    let defaulted = server.enqueue_to("slow").await;
    let own = server
        .enqueue(pb::EnqueueTaskRequest {
            execution_timeout: Some(wire_millis(60 * 60 * 1000)),
            ..task_in("slow")
        })
        .await;
    for _ in 0..2 {
        let claimed = server.claim_one(&runtime).await;
        server.start_task(&claimed).await.unwrap();
    }

    server.advance_time(Duration::from_secs(9 * 60)).await;
    server.heartbeat(&runtime).await;
    assert!(server.sweep().await.timed_out.is_empty());

    server.advance_time(Duration::from_secs(2 * 60)).await;
    // The runtime is alive and well: only the queue's default can end the task.
    server.heartbeat(&runtime).await;
    let report = server.sweep().await;
    assert!(report.runtime_offline.is_empty());
    assert_eq!(report.timed_out.len(), 1, "{report:?}");
    let ended = server.get_task(&defaulted.id).await;
    assert_eq!(
        ended.failure_reason(),
        pb::FailureReason::ExecutionTimeout,
        "{ended:?}"
    );
    assert_eq!(
        (status_of(&ended), ended.attempt),
        (pb::TaskStatus::Queued, 2)
    );
    let kept = server.get_task(&own.id).await;
    assert_eq!(
        status_of(&kept),
        pb::TaskStatus::Running,
        "its own timeout wins"
    );

    let cleared = set_default_execution_timeout(&server, "slow", wire_millis(0))
        .await
        .unwrap();
    assert_eq!(cleared.default_execution_timeout, None);
    assert_eq!(cleared.max_concurrent, 4);
    let negative = prost_types::Duration {
        seconds: -1,
        nanos: 0,
    };
    let refused = set_default_execution_timeout(&server, "slow", negative)
        .await
        .unwrap_err();
    assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
    let too_long = prost_types::Duration {
        seconds: 400 * 24 * 60 * 60,
        nanos: 0,
    };
    let refused = set_default_execution_timeout(&server, "slow", too_long)
        .await
        .unwrap_err();
    assert_error(&refused, Code::InvalidArgument, "INVALID_FIELD");
}

conformance!(
    finished_tasks_are_deleted_once_the_retention_passed,
    a_zero_retention_keeps_finished_tasks_forever,
    a_queue_default_execution_timeout_ends_tasks_without_their_own,
);

/// History written straight into the table: `count` tasks of `queue` in `status`, finished
/// `age` ago.
pub async fn insert_history(server: &TestServer, queue: &str, status: &str, count: i64, age: &str) {
    sqlx::query(
        "INSERT INTO tasks (id, queue, payload, status, attempt, max_attempts, created_at,
                            available_at, finished_at)
         SELECT gen_random_uuid(), $1, '\\x00'::bytea, $2, 1, 3, now() - $4::interval,
                now() - $4::interval, now() - $4::interval
         FROM generate_series(1, $3)",
    )
    .bind(queue)
    .bind(status)
    .bind(count)
    .bind(age)
    .execute(server.pool())
    .await
    .unwrap();
}

/// The largest number of rows any node of `statement`'s plan read (produced or filtered out),
/// over all its loops.
async fn most_rows_of_any_plan_node(server: &TestServer, statement: &str) -> f64 {
    let explain = format!("EXPLAIN (ANALYZE, FORMAT JSON) {statement}");
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_one(server.pool())
        .await
        .unwrap();
    fn walk(node: &serde_json::Value) -> f64 {
        // Rows a node read: those it produced and those its filter threw away.
        let field = |name: &str| node[name].as_f64().unwrap_or(0.0);
        let own = (field("Actual Rows") + field("Rows Removed by Filter"))
            * node["Actual Loops"].as_f64().unwrap_or(1.0);
        let children = node["Plans"]
            .as_array()
            .map_or(0.0, |plans| plans.iter().map(walk).fold(0.0, f64::max));
        own.max(children)
    }
    walk(&plan[0]["Plan"])
}

/// DescribeQueue with 40,000 finished tasks in the queue's history: the counts are exact, and
/// no step of its plan reads more than a handful of rows (the history is counted once, by the
/// sweeper). Redrives and retention keep the tally exact.
#[sqlx::test]
async fn describe_queue_does_not_read_the_history(pool: PgPoolOptions, connect: PgConnectOptions) {
    let server = TestServer::start_with(pool, connect, |config| {
        config.retain_finished = Duration::from_secs(2 * 24 * 60 * 60);
    })
    .await;
    insert_history(&server, "busy", "COMPLETED", 40_000, "1 day").await;
    insert_history(&server, "busy", "FAILED", 10, "1 day").await;
    insert_history(&server, "busy", "CANCELLED", 25, "3 days").await;
    // As if this history had been written over the last days, before the sweeper counted it.
    sqlx::query("UPDATE finished_tally_progress SET counted_through = now() - interval '30 days'")
        .execute(server.pool())
        .await
        .unwrap();
    let report = server.sweep().await;
    assert_eq!(report.deleted_finished, 25, "older than the retention");

    let runtime = server.register("now", &["busy"]).await;
    completed_task(&server, &runtime, "busy").await;
    let counts = server.describe_queue("busy").await.counts.unwrap();
    assert_eq!(
        (counts.completed, counts.failed, counts.cancelled),
        (40_001, 10, 0)
    );

    sqlx::query("ANALYZE tasks")
        .execute(server.pool())
        .await
        .unwrap();
    let statement = leasehold::store::postgres::statements::DESCRIBE_QUEUE.replace("$1", "'busy'");
    let most = most_rows_of_any_plan_node(&server, &statement).await;
    assert!(most < 100.0, "a plan node read {most} rows");
    // Nor do the queue gauges every sweep refreshes.
    let depths = leasehold::store::postgres::statements::QUEUE_DEPTHS;
    let most = most_rows_of_any_plan_node(&server, depths).await;
    assert!(
        most < 100.0,
        "a plan node of the queue gauges read {most} rows"
    );

    // A redrive takes a counted task out of FAILED.
    let failed: String = sqlx::query_scalar(
        "SELECT id::text FROM tasks WHERE queue = 'busy' AND status = 'FAILED' LIMIT 1",
    )
    .fetch_one(server.pool())
    .await
    .unwrap();
    server
        .admin
        .clone()
        .retry_task(pb::RetryTaskRequest { task_id: failed })
        .await
        .unwrap();
    let counts = server.describe_queue("busy").await.counts.unwrap();
    assert_eq!((counts.failed, counts.queued), (9, 1));

    // Two days on, retention takes the counted history, and the counts follow.
    // One sweep deletes a bounded number of batches; the rest waits for the next ones.
    server.advance_time(Duration::from_secs(24 * 60 * 60)).await;
    let mut deleted = Vec::new();
    loop {
        let report = server.sweep().await;
        if report.deleted_finished == 0 {
            break;
        }
        deleted.push(report.deleted_finished);
    }
    assert_eq!(deleted.iter().sum::<u64>(), 40_009, "{deleted:?}");
    assert!(deleted.len() >= 2, "{deleted:?}");
    let counts = server.describe_queue("busy").await.counts.unwrap();
    assert_eq!(
        (counts.completed, counts.failed, counts.queued),
        (1, 0, 1),
        "only what finished since stays"
    );
}

/// The retention stage is counted under `leasehold_sweeper_rows_total{stage="retention"}`.
#[tokio::test]
async fn deleted_rows_are_counted_in_a_metric() {
    let port = crate::harness::free_port();
    let address = format!("127.0.0.1:{port}");
    let server = Backend::Memory
        .start_with(|config| {
            config.metrics_listen = Some(address.parse().unwrap());
            config.retain_finished = HOUR;
            config.sweep_interval = Duration::from_millis(100);
        })
        .await;
    let runtime = server.register("metered", &["q"]).await;
    completed_task(&server, &runtime, "q").await;
    server.advance_time(HOUR * 2).await;
    let series = r#"leasehold_sweeper_rows_total{stage="retention"}"#;
    crate::harness::eventually(
        "the retention counter counts the deleted task",
        crate::harness::EVENTUALLY,
        async || {
            let metrics = crate::metrics::scrape(&address).await;
            (crate::metrics::sample(&metrics, series) >= 1.0).then_some(())
        },
    )
    .await;
}
