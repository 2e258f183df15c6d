//! One `StreamClaims` session (spec §5): claims pushed under credit-based flow control.
//!
//! The worker opens with `open {runtime_id, credits}` and grants more with `credit {n}`; every
//! pushed claim consumes one credit, so pushes never outrun the grants. While credits remain
//! and nothing is claimable, the session waits for a wake-up, a jittered re-check every
//! `--stream-poll-interval`, or the earliest expiry of a lease it pushed. When the session ends
//! for any reason (the worker closed it, the connection broke, the server is draining), the
//! claims it pushed that were not started go back to QUEUED at once (T4').
//!
//! Each session is one task and a few small buffers; an idle one touches neither PostgreSQL
//! (with Redis, its re-checks are answered from the empty-claim cache) nor the CPU.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tonic::{Status, Streaming};

use crate::coordinator::{CacheUse, ClaimedAs, Coordinator, MAX_CLAIM_BATCH, StreamSlot, jittered};
use crate::domain::auth::Principal;
use crate::domain::{ClaimToken, ClaimedTask, Error, Result, RuntimeId, TaskId};
use crate::wakeups::Subscription;

use super::stream_writes::StreamWrites;
use super::{access, convert};
use crate::proto::{
    self as pb, stream_claims_request::Msg as Inbound, stream_claims_response::Msg as Outbound,
};

/// Responses waiting to be written to the worker. Claims never exceed the credits granted,
/// so this only bounds keepalives and cancellations behind a slow reader.
pub(super) const OUTBOUND_BUFFER: usize = 64;

/// Credits a stream may hold unused, at open and after grants (spec §10); more are capped. A
/// runtime's `max_concurrency` bounds what its claims take anyway.
const MAX_CREDITS: u64 = 1_000;

/// The `open` message must arrive within this, or the call ends (spec §10).
const OPEN_WITHIN: Duration = Duration::from_secs(10);

pub(super) type Sender = mpsc::Sender<std::result::Result<pb::StreamClaimsResponse, Status>>;

/// Reads the `open` message and prepares the session; errors end the call before it starts.
pub(super) async fn open(
    coordinator: &Arc<Coordinator>,
    (principal, credential): (&Principal, Option<String>),
    inbound: &mut Streaming<pb::StreamClaimsRequest>,
) -> Result<Session> {
    if coordinator.draining().is_cancelled() {
        return Err(Error::Draining);
    }
    let first = tokio::time::timeout(OPEN_WITHIN, inbound.message())
        .await
        .map_err(|_| Error::invalid("open", "the first message must arrive within 10 s"))?
        .map_err(|_| Error::invalid("open", "the stream ended before its first message"))?;
    let Some(pb::StreamClaimsRequest {
        msg: Some(Inbound::Open(open)),
    }) = first
    else {
        return Err(Error::invalid("open", "the first message must be open"));
    };
    let runtime_id = convert::runtime_id("open.runtime_id", &open.runtime_id)?;
    access::runtime(principal, runtime_id)?;
    let slot = coordinator.admit_stream(runtime_id)?;
    if open.credits == 0 {
        // With credits, the first claim comes at once and does the same.
        coordinator.stream_opened(runtime_id).await?;
    }
    let subscription = coordinator.subscribe(runtime_id).await?;
    // Credits at open: at most the runtime's free slots (a worker offers what it can run);
    // grants later: at most its max_concurrency. The claim enforces the cap in any case.
    let capacity = coordinator.runtime_capacity(runtime_id).await?;
    let credit_cap = match capacity.max_concurrency {
        0 => MAX_CREDITS,
        most => u64::from(most).min(MAX_CREDITS),
    };
    let free = capacity.free().map_or(MAX_CREDITS, u64::from);
    let credits = u64::from(open.credits).min(free).min(credit_cap);
    Ok(Session {
        credit_cap,
        _slot: slot,
        writes: StreamWrites::new(coordinator.clone(), credential.clone()),
        credential,
        coordinator: coordinator.clone(),
        runtime_id,
        credits,
        subscription,
        cancellations: coordinator.hold_cancellations(runtime_id),
        pushed: VecDeque::new(),
        cache: CacheUse::Read,
        peak_credits: credits,
        flowing: false,
        claimed_as: if open.auto_start {
            ClaimedAs::Started
        } else {
            ClaimedAs::Dispatched
        },
    })
}

pub(super) struct Session {
    /// The most unused credits this stream may hold.
    credit_cap: u64,
    /// This stream's place among its runtime's open streams (`--max-streams-per-runtime`).
    _slot: StreamSlot,
    /// Starts, completes and fails the worker sends on this stream.
    writes: StreamWrites,
    /// The bearer token the stream opened with, checked again before every claim.
    credential: Option<String>,
    coordinator: Arc<Coordinator>,
    runtime_id: RuntimeId,
    /// Granted and not yet used.
    credits: u64,
    subscription: Subscription,
    cancellations: mpsc::Receiver<TaskId>,
    /// Claims pushed on this stream whose lease has not passed yet, oldest first: the ones a
    /// broken stream must give back. Older ones were either started or are the preflight's.
    pushed: VecDeque<PushedClaim>,
    /// How the next claim may use the empty-claim cache: not after a wake-up.
    cache: CacheUse,
    /// The most credits the worker has had free at once: its window.
    peak_credits: u64,
    /// The last claim got all it asked for: work is flowing, so credits may be gathered.
    flowing: bool,
    /// Started by their claim (`auto_start`), or dispatched for the worker to start.
    claimed_as: ClaimedAs,
}

struct PushedClaim {
    task_id: TaskId,
    token: ClaimToken,
    lease_expires_at: DateTime<Utc>,
}

/// Why the session loop stopped.
enum End {
    /// The worker closed its side, or the connection broke.
    WorkerGone,
    Draining,
    Failed(Status),
}

impl Session {
    pub(super) async fn run(
        mut self,
        mut inbound: Streaming<pb::StreamClaimsRequest>,
        outbound: Sender,
    ) {
        let open = self.coordinator.metrics().stream_session_open();
        let end = self.serve(&mut inbound, &outbound).await;
        drop(open);
        match end {
            End::Draining => {
                let _ = outbound
                    .send(Ok(response(Outbound::Draining(pb::Draining {}))))
                    .await;
            }
            End::Failed(status) => {
                super::observe::count_refusal(self.coordinator.metrics(), &status);
                let _ = outbound.send(Err(status)).await;
            }
            End::WorkerGone => {}
        }
        self.give_back_unstarted().await;
        // The response stream ends when `outbound` drops here, after the claims went back.
    }

    async fn serve(
        &mut self,
        inbound: &mut Streaming<pb::StreamClaimsRequest>,
        outbound: &Sender,
    ) -> End {
        let settings = *self.coordinator.settings();
        let mut keepalive = tokio::time::interval_at(
            Instant::now() + settings.stream_keepalive,
            settings.stream_keepalive,
        );
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let draining = self.coordinator.draining().clone();
        let mut want_claims = true;
        let mut recheck = Instant::now();
        let mut gathering: Option<Instant> = None;
        loop {
            if want_claims
                && self.credits > 0
                && !self.still_gathering(&mut gathering, settings.stream_claim_linger)
            {
                gathering = None;
                match self.push_claims(outbound).await {
                    Ok(PushOutcome::More) => continue,
                    Ok(PushOutcome::NothingMore) => {
                        want_claims = false;
                        recheck = self.next_recheck(settings.stream_poll_interval);
                    }
                    Ok(PushOutcome::WorkerGone) => return End::WorkerGone,
                    Err(error @ (Error::RuntimeNotFound(_) | Error::Unauthenticated(_))) => {
                        return End::Failed(error.into());
                    }
                    Err(error) => {
                        tracing::warn!(%error, runtime_id = %self.runtime_id, "stream claim failed; retrying after the poll interval");
                        want_claims = false;
                        recheck = Instant::now() + jittered(settings.stream_poll_interval);
                    }
                }
            }
            tokio::select! {
                biased;
                () = draining.cancelled() => return End::Draining,
                message = inbound.message() => match message {
                    Ok(Some(request)) => match self.receive(request, outbound) {
                        Ok(granted) => want_claims |= granted,
                        Err(status) => return End::Failed(status),
                    },
                    Ok(None) | Err(_) => return End::WorkerGone,
                },
                Some(task_id) = self.cancellations.recv() => {
                    let cancelled = Outbound::Cancelled(pb::TaskCancelled { task_id: task_id.to_string() });
                    if outbound.send(Ok(response(cancelled))).await.is_err() {
                        return End::WorkerGone;
                    }
                }
                () = self.subscription.woken(), if self.credits > 0 => {
                    want_claims = true;
                    self.cache = CacheUse::Bypass;
                }
                () = tokio::time::sleep_until(recheck), if self.credits > 0 && !want_claims => {
                    want_claims = true;
                }
                () = sleep_until_some(gathering), if gathering.is_some() => {}
                _ = keepalive.tick() => {
                    let beat = Outbound::Keepalive(pb::Keepalive {
                        server_time: Some(convert::timestamp(Utc::now())),
                    });
                    if outbound.send(Ok(response(beat))).await.is_err() {
                        return End::WorkerGone;
                    }
                }
                () = outbound.closed() => return End::WorkerGone,
            }
        }
    }

    /// Whether to hold the claim a little longer for more credits. While claims keep finding
    /// work, credits come back one per finished task, and claiming on each would cost one
    /// statement per task; waiting until half the window is free, for at most `linger` after
    /// the first waiting credit, claims several at once. A stream whose last claim found the
    /// queue short claims at once: then latency is what matters.
    fn still_gathering(&self, gathering: &mut Option<Instant>, linger: Duration) -> bool {
        let enough = (self.peak_credits / 2).clamp(1, u64::from(MAX_CLAIM_BATCH));
        if !self.flowing || self.credits >= enough || linger.is_zero() {
            return false;
        }
        let until = *gathering.get_or_insert_with(|| Instant::now() + linger);
        Instant::now() < until
    }

    /// Handles one worker message; `true` when it granted credits.
    fn receive(
        &mut self,
        request: pb::StreamClaimsRequest,
        outbound: &Sender,
    ) -> std::result::Result<bool, Status> {
        if matches!(
            request.msg,
            Some(Inbound::Credit(_) | Inbound::Ack(_) | Inbound::Write(_))
        ) {
            self.coordinator.note_sign_of_life(self.runtime_id);
        }
        match request.msg {
            Some(Inbound::Credit(grant)) => Ok(self.grant(grant.n)),
            Some(Inbound::Write(write)) => {
                let granted = self.grant(write.credit);
                self.writes.spawn(write, outbound);
                Ok(granted)
            }
            // A receipt only: the claim stays this stream's until it is started.
            Some(Inbound::Ack(_)) => Ok(false),
            Some(Inbound::Open(_)) => {
                Err(Error::invalid("open", "the stream is already open").into())
            }
            None => Err(Error::invalid("msg", "empty message").into()),
        }
    }

    /// Adds `n` credits (up to the cap); `true` when it granted any.
    fn grant(&mut self, n: u32) -> bool {
        self.credits = (self.credits + u64::from(n)).min(self.credit_cap);
        self.peak_credits = self.peak_credits.max(self.credits);
        n > 0
    }

    /// Claims up to the credits left (one batch) and pushes them.
    async fn push_claims(&mut self, outbound: &Sender) -> Result<PushOutcome> {
        // A worker that went away claims nothing more: its claim would also revive a runtime
        // it just deregistered (a claim is a sign of life), e.g. when the deregistration's
        // own requeue wakes this stream before it noticed the worker left.
        if outbound.is_closed() {
            return Ok(PushOutcome::WorkerGone);
        }
        // The credential the stream opened with must still hold: a runtime token revoked by a
        // re-registration stops its old streams too. (From the credential cache: no round trip.)
        self.coordinator
            .authenticate(self.credential.as_deref())
            .await?;
        self.forget_passed_leases();
        let asked = u32::try_from(self.credits.min(u64::from(MAX_CLAIM_BATCH))).unwrap_or(1);
        let cache = std::mem::replace(&mut self.cache, CacheUse::Read);
        let claimed = self
            .coordinator
            .claim_with(self.runtime_id, Some(asked), None, cache, self.claimed_as)
            .await?;
        let got = claimed.len();
        self.flowing = got == asked as usize;
        for claim in claimed {
            self.credits -= 1;
            // A started task runs on the worker: a broken stream does not give it back.
            if self.claimed_as == ClaimedAs::Dispatched {
                self.pushed.push_back(PushedClaim {
                    task_id: claim.task.id,
                    token: claim.claim_token,
                    lease_expires_at: claim.lease_expires_at,
                });
            }
            if outbound.send(Ok(pushed(claim))).await.is_err() {
                return Ok(PushOutcome::WorkerGone);
            }
        }
        Ok(if got == asked as usize && self.credits > 0 {
            PushOutcome::More
        } else {
            PushOutcome::NothingMore
        })
    }

    /// When to look again without a wake-up: after the poll interval, or when the earliest
    /// lease pushed here passes (its requeue is this runtime's preflight's to do).
    fn next_recheck(&self, poll_interval: std::time::Duration) -> Instant {
        let poll = Instant::now() + jittered(poll_interval);
        let lease = self.pushed.iter().map(|claim| claim.lease_expires_at).min();
        match lease.and_then(|at| (at - Utc::now()).to_std().ok()) {
            Some(left) => poll.min(Instant::now() + left),
            None => poll,
        }
    }

    fn forget_passed_leases(&mut self) {
        let now = Utc::now();
        while self
            .pushed
            .front()
            .is_some_and(|claim| claim.lease_expires_at < now)
        {
            self.pushed.pop_front();
        }
    }

    /// T4': whatever was pushed here and not started goes back to QUEUED now.
    async fn give_back_unstarted(&mut self) {
        self.forget_passed_leases();
        let claims: Vec<(TaskId, ClaimToken)> = self
            .pushed
            .drain(..)
            .map(|claim| (claim.task_id, claim.token))
            .collect();
        match self
            .coordinator
            .expire_stream_claims(self.runtime_id, &claims)
            .await
        {
            Ok(0) => {}
            Ok(requeued) => {
                tracing::info!(runtime_id = %self.runtime_id, requeued, "claim stream ended; unstarted claims requeued")
            }
            Err(error) => {
                tracing::warn!(%error, runtime_id = %self.runtime_id, "claim stream ended; its unstarted claims wait for their leases to pass")
            }
        }
    }
}

/// Sleeps until `at`; the caller only polls this while `at` is set.
async fn sleep_until_some(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

enum PushOutcome {
    /// A full batch went out and credits remain: claim again at once.
    More,
    NothingMore,
    WorkerGone,
}

fn response(msg: Outbound) -> pb::StreamClaimsResponse {
    pb::StreamClaimsResponse { msg: Some(msg) }
}

fn pushed(claim: ClaimedTask) -> pb::StreamClaimsResponse {
    response(Outbound::Claimed(convert::claimed_task(claim)))
}
