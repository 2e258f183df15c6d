//! Claim streams across two replicas sharing one database and one Redis: wake-ups and
//! cancellations cross, and how long a wake-up takes on one replica and across two.

use super::*;

/// Enqueues on `producer` and times until `stream` receives the claim, `samples` times.
async fn wakeup_latencies(
    producer: &TestServer,
    stream: &mut ClaimStream,
    samples: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let enqueued_at = Instant::now();
        let task = producer.enqueue_to("q").await;
        let claimed = stream.next_claimed().await;
        latencies.push(enqueued_at.elapsed());
        assert_eq!(task_id(&claimed), task.id);
        stream.grant(1).await;
    }
    latencies.sort();
    latencies
}

fn summary(latencies: &[Duration]) -> String {
    format!(
        "median {:?}, max {:?} over {}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len()
    )
}

/// Two replicas, one database, one Redis: an enqueue on A wakes a stream held by B, and a
/// cancellation on A reaches it. Streams never poll here, so only a wake-up can deliver.
/// Prints the enqueue → claimed latency on one replica and across two.
#[sqlx::test]
async fn wake_ups_and_cancellations_cross_replicas(pool: PgPoolOptions, connect: PgConnectOptions) {
    let prefix = format!("leasehold-test-{}", uuid::Uuid::new_v4());
    let configure = |config: &mut leasehold::config::Config| {
        config.redis_url = Some(crate::redis::redis_url());
        config.redis_key_prefix = prefix.clone();
        config.stream_poll_interval = NO_POLLING;
    };
    let a = TestServer::start_with(pool.clone(), connect.clone(), configure).await;
    let b = TestServer::start_with(pool, connect, configure).await;
    crate::redis::wait_until_redis_is_used(&a).await;
    crate::redis::wait_until_redis_is_used(&b).await;
    let runtime = b.register("on-b", &["q"]).await;
    let mut stream = ClaimStream::open(&b, &runtime, 1).await;

    // The first one may wait for B's subscription to be in place.
    let first = a.enqueue_to("q").await;
    match stream.next(Duration::from_secs(10)).await {
        Some(Outbound::Claimed(claimed)) => assert_eq!(task_id(&claimed), first.id),
        other => panic!("B's stream was not woken by A's enqueue: {other:?}"),
    }
    stream.grant(1).await;

    let across = wakeup_latencies(&a, &mut stream, 100).await;
    let local = wakeup_latencies(&b, &mut stream, 100).await;
    println!("wake-up latency, one replica: {}", summary(&local));
    println!("wake-up latency, across two replicas: {}", summary(&across));

    let held = stream.next_claimed_after(&a, task_in("q")).await;
    a.tasks
        .clone()
        .cancel_task(pb::CancelTaskRequest {
            task_id: task_id(&held).into(),
        })
        .await
        .unwrap();
    match stream.next(PROMPTLY).await {
        Some(Outbound::Cancelled(cancelled)) => assert_eq!(cancelled.task_id, task_id(&held)),
        other => panic!("the cancellation on A did not reach B's stream: {other:?}"),
    }
}

impl ClaimStream {
    /// Enqueues `task` on `producer` and returns the claim this stream receives for it.
    async fn next_claimed_after(
        &mut self,
        producer: &TestServer,
        task: pb::EnqueueTaskRequest,
    ) -> pb::ClaimedTask {
        let task = producer.enqueue(task).await;
        let claimed = self.next_claimed().await;
        assert_eq!(task_id(&claimed), task.id);
        claimed
    }
}
