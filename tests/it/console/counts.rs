//! The queue page's figures on PostgreSQL: the sweep's snapshot, not a count of the tasks
//! table, and the per-minute chart.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::client::Visitor;
use super::console_server;
use crate::harness::Backend;

/// On PostgreSQL the queue page reads the sweep's snapshot, not the tasks table: a task
/// enqueued after the sweep shows at the next one; the chart counts finished tasks per minute.
#[sqlx::test]
async fn the_queue_page_shows_the_last_sweeps_counts_and_the_minutes(
    pool: PgPoolOptions,
    connect: PgConnectOptions,
) {
    let (server, address) =
        console_server(Backend::Postgres(Box::new((pool, connect))), false).await;
    let runtime = server.register("w1", &["charts"]).await;
    for _ in 0..3 {
        server.enqueue_to("charts").await;
    }
    let claimed = server.claim(&runtime, Some(3)).await;
    for task in &claimed[..2] {
        server.start_task(task).await.unwrap();
        server.complete(task, b"ok").await.unwrap();
    }
    server.start_task(&claimed[2]).await.unwrap();
    server.fail(&claimed[2], false).await.unwrap();
    // Past the chart's settle time, and after the count's watermark.
    sqlx::query("UPDATE tasks SET finished_at = finished_at - interval '30 seconds'")
        .execute(server.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE queue_minutes_progress SET counted_through = now() - interval '1 hour'")
        .execute(server.pool())
        .await
        .unwrap();
    server.enqueue_to("charts").await;
    server.sweep().await;
    let mut visitor = Visitor::new(address);
    let page = visitor.get("/queues").await;
    assert!(
        page.body.contains("data-completed=\"2\"") && page.body.contains("data-failed=\"1\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("<td class=\"count queued\">1</td>"));

    server.enqueue_to("charts").await;
    let before_sweep = visitor.get("/queues").await;
    assert!(
        before_sweep
            .body
            .contains("<td class=\"count queued\">1</td>"),
        "the snapshot"
    );
    server.sweep().await;
    let after_sweep = visitor.get("/queues").await;
    assert!(
        after_sweep
            .body
            .contains("<td class=\"count queued\">2</td>")
    );
}
