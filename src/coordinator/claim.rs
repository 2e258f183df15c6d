//! Claims: unary (with the empty-claim cache and long-polls), and what claim streams need
//! (admission, capacity, subscriptions, giving back unstarted claims).

use super::*;

impl Coordinator {
    /// A slot for one more claim stream of `runtime_id` on this replica, or TOO_MANY_STREAMS.
    pub fn admit_stream(&self, runtime_id: RuntimeId) -> Result<StreamSlot> {
        let limit = self.settings.max_streams_per_runtime;
        let mut open = self
            .open_streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(runtime_id).or_default();
        if *count >= limit {
            return Err(Error::TooManyStreams(limit));
        }
        *count += 1;
        Ok(StreamSlot {
            runtime: runtime_id,
            open_streams: self.open_streams.clone(),
        })
    }

    /// What a new claim stream may be granted: the runtime's free slots under its
    /// `max_concurrency` (spec §10).
    pub async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        self.store.runtime_capacity(runtime_id).await
    }

    /// A claim stream opened: a sign of life that, like a claim, brings an OFFLINE runtime
    /// back ONLINE (and runs the preflight).
    pub async fn stream_opened(&self, runtime_id: RuntimeId) -> Result<()> {
        self.claim(runtime_id, Some(0), None, CacheUse::Bypass)
            .await
            .map(drop)
    }

    /// Preflight requeue and claim. `max_tasks`: absent = 1, 0 = only the preflight, capped at
    /// [`MAX_CLAIM_BATCH`]. `budget` is the time left before the caller's deadline.
    ///
    /// With Redis, a runtime whose last claim found nothing, and for which nothing changed
    /// since, is answered from the empty-claim cache without touching PostgreSQL. Such a
    /// verdict never outlives the runtime's earliest lease, so the preflight it skips would
    /// have requeued nothing.
    pub async fn claim(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        budget: Option<Duration>,
        cache: CacheUse,
    ) -> Result<Vec<ClaimedTask>> {
        self.claim_with(runtime_id, max_tasks, budget, cache, ClaimedAs::Dispatched)
            .await
    }

    /// [`Coordinator::claim`], its tasks handed out `claimed_as` (a stream may ask for them
    /// started: StreamClaims' `auto_start`).
    pub async fn claim_with(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        budget: Option<Duration>,
        cache: CacheUse,
        claimed_as: ClaimedAs,
    ) -> Result<Vec<ClaimedTask>> {
        let max_tasks = max_tasks.unwrap_or(1).min(MAX_CLAIM_BATCH);
        let read_and_claim = async {
            let snapshot = if max_tasks > 0 && cache == CacheUse::Read {
                self.claim_cache.snapshot(runtime_id).await
            } else {
                None
            };
            if snapshot
                .as_ref()
                .is_some_and(|snapshot| snapshot.says_empty())
            {
                return Ok((snapshot, None));
            }
            let request = ClaimRequest {
                runtime_id,
                max_tasks,
                budget,
                auto_start: claimed_as == ClaimedAs::Started,
            };
            Ok((snapshot, Some(self.store.claim(request).await?)))
        };
        let (snapshot, outcome) = read_and_claim.await?;
        self.note_sign_of_life(runtime_id);
        self.metrics
            .claim_answered(if outcome.is_some() { "store" } else { "cache" });
        let Some(outcome) = outcome else {
            return Ok(Vec::new());
        };
        self.count_preflight(&outcome.preflight);
        self.metrics.tasks_claimed(outcome.claimed.len());
        if claimed_as == ClaimedAs::Started {
            self.metrics.tasks_started(outcome.claimed.len());
        }
        self.announce_topics(Wakes::of_moves(&outcome.preflight), &[])
            .await;
        if !outcome.claimed.is_empty() && self.claim_cache.is_active() {
            // The runtime's horizon changed (a new lease of its own): any verdict read before
            // this claim must not be trusted. Nobody needs waking for it, and the claim need
            // not wait for it: a verdict is stored only with the versions read before its own
            // claim, so one read before this bump lands is replaced by it whenever it lands.
            let claim_cache = self.claim_cache.clone();
            tokio::spawn(async move { claim_cache.invalidate(runtime_id).await });
        }
        // A verdict needs the versions read before the claim, which a bypassing claim did not
        // read. (A first claim reads none either: its horizon teaches the cache the queues.)
        if outcome.claimed.is_empty()
            && max_tasks > 0
            && cache == CacheUse::Read
            && self.claim_cache.is_active()
        {
            let horizon = self.store.claim_horizon(runtime_id).await?;
            self.claim_cache
                .remember_empty(runtime_id, snapshot, &horizon)
                .await;
        }
        Ok(outcome.claimed)
    }

    /// ClaimTask with `wait`: claims at once, and when nothing is claimable waits (up to
    /// min(wait, 30s), ending before the caller's deadline) for a wake-up or the poll interval,
    /// then claims again.
    pub async fn claim_waiting(
        &self,
        runtime_id: RuntimeId,
        max_tasks: Option<u32>,
        wait: Duration,
        budget: Option<Duration>,
    ) -> Result<Vec<ClaimedTask>> {
        let wait = budget.map_or(wait, |budget| {
            wait.min(budget.saturating_sub(DEADLINE_MARGIN))
        });
        let wait = wait.min(MAX_CLAIM_WAIT);
        if wait.is_zero() || max_tasks == Some(0) {
            return self
                .claim(runtime_id, max_tasks, budget, CacheUse::Read)
                .await;
        }
        let started = tokio::time::Instant::now();
        let until = started + wait;
        // Subscribed before the first claim, so a change committed after it wakes us.
        let subscription = self.subscribe(runtime_id).await?;
        let mut cache = CacheUse::Read;
        loop {
            let budget_left = budget.map(|budget| budget.saturating_sub(started.elapsed()));
            let claimed = self
                .claim(runtime_id, max_tasks, budget_left, cache)
                .await?;
            if !claimed.is_empty() || tokio::time::Instant::now() >= until {
                return Ok(claimed);
            }
            let recheck =
                tokio::time::Instant::now() + jittered(self.settings.stream_poll_interval);
            tokio::select! {
                () = subscription.woken() => cache = CacheUse::Bypass,
                () = tokio::time::sleep_until(recheck.min(until)) => cache = CacheUse::Read,
                // Shutting down: answer now rather than hold the drain.
                () = self.draining.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Wake-ups for what `runtime_id` can claim: its queues and its pin set.
    pub async fn subscribe(&self, runtime_id: RuntimeId) -> Result<Subscription> {
        let queues = match self.claim_cache.known_queues(runtime_id) {
            Some(queues) => queues.to_vec(),
            None => {
                let horizon = self.store.claim_horizon(runtime_id).await?;
                self.claim_cache.learn_queues(runtime_id, &horizon.queues);
                horizon.queues
            }
        };
        let mut topics: Vec<Topic> = queues.into_iter().map(Topic::Queue).collect();
        topics.push(Topic::Runtime(runtime_id));
        Ok(self.notifier.subscribe(topics))
    }

    /// Cancellations of the tasks `runtime_id` holds, for one claim stream.
    pub fn hold_cancellations(&self, runtime_id: RuntimeId) -> mpsc::Receiver<TaskId> {
        self.notifier.hold(runtime_id)
    }

    /// T4': a claim stream ended; the claims pushed on it that were not started go back to
    /// QUEUED at once. Returns how many.
    pub async fn expire_stream_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<usize> {
        if claims.is_empty() {
            return Ok(0);
        }
        let expired = self.store.expire_claims(runtime_id, claims).await?;
        for moved in &expired {
            let cause = match moved.status {
                TaskStatus::Failed => "poison",
                _ => "stream_break",
            };
            self.metrics.lease_expired(cause);
        }
        self.announce(&expired).await;
        Ok(expired.len())
    }
}
