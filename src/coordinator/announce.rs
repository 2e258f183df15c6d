//! Announcing changes: after every change that commits, the topics it touched get their cache
//! versions bumped and their waiters woken, here and on other replicas. Also the sweep, whose
//! moves are announced the same way, and the metrics the service layer counts.

use super::*;

impl Coordinator {
    /// Delivers other replicas' wake-ups and cancellations here until `stop`.
    pub async fn relay_wakeups(&self, redis: Arc<RedisLink>, stop: CancellationToken) {
        let forget = || self.authenticator.forget_everything();
        self.relay
            .run(redis, self.notifier.clone(), &forget, stop)
            .await;
    }

    /// One sweep (spec §6); `None` when another replica is sweeping.
    pub async fn sweep(&self, due_since: Option<DateTime<Utc>>) -> Result<Option<SweepReport>> {
        let report = self
            .store
            .sweep(&self.settings.sweep, &self.liveness, due_since)
            .await?;
        if let Some(report) = &report {
            self.count_server_failures("RUNTIME_OFFLINE", &report.runtime_offline);
            self.count_server_failures("TIMEOUT", &report.timed_out);
            self.count_server_failures("RUNTIME_GONE", &report.runtime_gone);
            self.announce(report.moves()).await;
            self.refresh_queue_gauges().await;
        }
        Ok(report)
    }

    /// Queue depth gauges, refreshed by the sweeping replica only (one query per sweep, not
    /// one per scrape). Queues that emptied are set to zero.
    pub(super) async fn refresh_queue_gauges(&self) {
        let depths = match self.store.queue_depths().await {
            Ok(depths) => depths,
            Err(error) => {
                tracing::warn!(%error, "cannot read queue depths");
                return;
            }
        };
        let mut reported = self
            .gauged_queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let emptied: Vec<String> = reported
            .iter()
            .filter(|queue| !depths.iter().any(|depth| &depth.queue == *queue))
            .cloned()
            .collect();
        for queue in emptied {
            self.metrics.queue_depth(&queue, 0, 0, 0, None);
            reported.remove(&queue);
        }
        for depth in depths {
            self.metrics.queue_depth(
                &depth.queue,
                depth.queued,
                depth.dispatched,
                depth.running,
                depth.oldest_queued_age,
            );
            reported.insert(depth.queue);
        }
    }

    /// Tells everyone that these tasks moved. Call after the change committed. A task that
    /// becomes claimable only later (delay, retry backoff) is announced again then.
    pub(super) async fn announce<'a>(&self, moves: impl IntoIterator<Item = &'a TaskMove>) {
        let now = Utc::now();
        let mut wakes = Wakes::default();
        for moved in moves {
            if moved.status == TaskStatus::Queued
                && let Ok(later) = (moved.available_at - now).to_std()
                && !later.is_zero()
            {
                // Versions change now; waiters are woken when it comes due.
                for topic in Topic::for_move(moved) {
                    wakes.add(topic, 0);
                }
                self.due.schedule(later, moved);
            } else {
                wakes.add_move(moved);
            }
        }
        self.announce_topics(wakes, &[]).await;
    }

    /// Announces delayed tasks as they come due, until `stop`.
    pub async fn announce_due_tasks(&self, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                wakes = self.due.next_due() => self.announce_topics(wakes, &[]).await,
            }
        }
    }

    /// Bumps the versions of the topics (Redis), then wakes their waiters (as many as `wakes`
    /// says) and pushes `cancellations`, on this replica and (through Redis) on the others.
    ///
    /// The versions change before anyone is woken (spec §6), so no waiter can find the
    /// verdict that the change made stale still standing. (A woken waiter claims with
    /// [`CacheUse::Bypass`] anyway: the bump may have failed with Redis out of reach.)
    pub(super) async fn announce_topics(&self, wakes: Wakes, cancellations: &[Cancellation]) {
        if let Some(redis) = &self.redis {
            redis.announce(&self.relay, &wakes, cancellations).await;
        }
        self.notifier.wake(&wakes);
        for cancellation in cancellations {
            self.notifier
                .cancelled(cancellation.runtime, cancellation.task);
        }
    }

    pub(super) async fn announce_task(&self, task: &Task) {
        self.announce([&TaskMove::from(task)]).await;
    }
}

impl Coordinator {
    pub(super) fn count_preflight(&self, moves: &[TaskMove]) {
        for moved in moves {
            let cause = if moved.status == TaskStatus::Failed {
                "poison"
            } else {
                "preflight"
            };
            self.metrics.lease_expired(cause);
        }
    }

    pub(super) fn count_server_failures(&self, reason: &'static str, moves: &[TaskMove]) {
        for moved in moves {
            self.metrics
                .task_failed(reason, moved.status == TaskStatus::Queued);
        }
    }
}
