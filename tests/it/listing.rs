//! ListTasks filters and paging; DescribeQueue and UpdateQueue.

use std::collections::HashSet;

use leasehold::proto::{self as pb, TaskStatus};
use tonic::Code;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::harness::{Backend, TestServer, assert_error};

async fn list_tasks_pages_through_every_match_exactly_once(backend: Backend) {
    let server = backend.start().await;
    let mut expected = HashSet::new();
    for _ in 0..7 {
        expected.insert(server.enqueue_to("q").await.id);
    }
    server.enqueue_to("other").await;

    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = server
            .tasks
            .clone()
            .list_tasks(pb::ListTasksRequest {
                queue: "q".into(),
                page_size: 3,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.len() <= 3);
        seen.extend(page.tasks.into_iter().map(|task| task.id));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
}

async fn list_tasks_filters_by_status_and_runtime(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let claimed = server.claim_one(&runtime).await;
    let list = |request: pb::ListTasksRequest| {
        let mut tasks = server.tasks.clone();
        async move { tasks.list_tasks(request).await.unwrap().into_inner().tasks }
    };
    let dispatched = list(pb::ListTasksRequest {
        statuses: vec![TaskStatus::Dispatched.into()],
        ..Default::default()
    })
    .await;
    assert_eq!(dispatched.len(), 1);
    assert_eq!(dispatched[0].id, claimed.task.as_ref().unwrap().id);
    let by_runtime = list(pb::ListTasksRequest {
        runtime_id: runtime,
        ..Default::default()
    })
    .await;
    assert_eq!(by_runtime.len(), 1);

    let status = server
        .tasks
        .clone()
        .list_tasks(pb::ListTasksRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_error(&status, Code::InvalidArgument, "INVALID_FIELD");
}

async fn describe_queue_counts_tasks_per_status(backend: Backend) {
    let server = backend.start().await;
    let runtime = server.register("worker-1", &["q"]).await;
    let oldest = server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    server.enqueue_to("q").await;
    let running = server.claim_one(&runtime).await;
    server.start_task(&running).await.unwrap();
    let updated = server.update_queue("q", Some(4), None).await;
    assert_eq!(updated.max_concurrent, 4);
    assert!(!updated.paused);
    let described = server
        .admin
        .clone()
        .describe_queue(pb::DescribeQueueRequest { queue: "q".into() })
        .await
        .unwrap()
        .into_inner();
    let counts = described.counts.unwrap();
    assert_eq!((counts.queued, counts.running, counts.completed), (2, 1, 0));
    assert_eq!(described.max_concurrent, 4);
    // The oldest task was claimed; the oldest queued one is younger than it.
    assert!(described.oldest_queued_at.unwrap().nanos >= 0);
    assert_ne!(described.oldest_queued_at, oldest.created_at);

    let unknown = server
        .admin
        .clone()
        .describe_queue(pb::DescribeQueueRequest {
            queue: "never-used".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown.counts.unwrap(), pb::TaskCounts::default());
    assert_eq!(unknown.oldest_queued_at, None);
}

conformance!(
    list_tasks_pages_through_every_match_exactly_once,
    list_tasks_filters_by_status_and_runtime,
    describe_queue_counts_tasks_per_status,
);

/// DescribeQueue must not scan the tasks table: with sequential scans priced out, the plan
/// still needs none (every part has an index).
#[sqlx::test]
async fn describe_queue_reads_indexes_not_the_table(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let server = TestServer::start(pool, connect).await;
    server.enqueue_to("q").await;
    let mut connection = server.pool().acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *connection)
        .await
        .unwrap();
    let explain = format!(
        "EXPLAIN (FORMAT TEXT) {}",
        leasehold::store::postgres::statements::DESCRIBE_QUEUE.replace("$1", "'q'")
    );
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .fetch_all(&mut *connection)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Seq Scan on tasks"), "{plan}");
}

/// ListRuntimes is paged like ListTasks: by name, `page_size` at a time, the token continuing
/// after the page's last runtime.
async fn runtimes_are_listed_in_pages(backend: Backend) {
    let server = backend.start().await;
    let mut names: Vec<String> = (0..7).map(|index| format!("runtime-{index}")).collect();
    for name in &names {
        server.register(name, &["q"]).await;
    }
    names.sort();
    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = server
            .admin
            .clone()
            .list_runtimes(pb::ListRuntimesRequest {
                status: None,
                page_size: 3,
                page_token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.runtimes.len() <= 3);
        listed.extend(page.runtimes.into_iter().map(|runtime| runtime.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!((listed, pages), (names, 3));
    let bad = server
        .admin
        .clone()
        .list_runtimes(pb::ListRuntimesRequest {
            status: None,
            page_size: 3,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_error(&bad, Code::InvalidArgument, "INVALID_FIELD");
}

conformance!(runtimes_are_listed_in_pages);
