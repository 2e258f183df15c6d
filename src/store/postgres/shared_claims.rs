//! Claims of one replica share statements, as starts and completes do (`coalesce`): claims
//! that arrive while the replica's write turn is taken go out together in the next claim
//! statement, `claim::claim_many` (`functions/leasehold_claim_many.sql`), which walks the
//! queues once for all of them and deals the tasks to the claims in order (the same rules,
//! preflight and errors as alone). A quiet replica's claim still goes out at once, alone.
//!
//! What sharing saves is everything a claim pays per statement rather than per task: the round
//! trip, the commit and its WAL flush, and the connection of its own. The claim statement
//! waits for the replica's write turn (`coalesce::next_batch`), which starts and completes
//! share: one owner-write statement of a replica runs at a time, and the claims arriving
//! meanwhile gather for the next.
//!
//! A shared statement that fails (a runtime deregistered meanwhile, one claim's deadline
//! passing, a deadlock over capped queues' rows) is rolled back whole, and each of its claims
//! runs alone instead: sharing may make a claim slower, never different.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::claim::claim_many;
use super::coalesce::next_batch;
use super::pooler::Db;
use super::rows::TaskRow;
use crate::store::{ClaimRequest, StorePolicy};
use crate::telemetry::metrics::Metrics;

/// Most claims in one statement.
const MAX_CLAIMS: usize = 64;

/// A claim's rows as its own statement would have answered them; `None`: run it alone.
pub(super) type SharedClaim = Option<Vec<TaskRow>>;

struct Pending {
    request: ClaimRequest,
    /// When the caller's budget runs out.
    deadline: Option<Instant>,
    reply: oneshot::Sender<SharedClaim>,
}

/// The replica's claim loop, started by its first claim and ended when the store is dropped.
pub(super) struct SharedClaims {
    statement: Statement,
    turn: Arc<Semaphore>,
    sender: OnceLock<mpsc::UnboundedSender<Pending>>,
    metrics: Arc<OnceLock<Metrics>>,
}

impl SharedClaims {
    pub(super) fn new(
        db: Db,
        policy: &StorePolicy,
        turn: Arc<Semaphore>,
        metrics: Arc<OnceLock<Metrics>>,
    ) -> Self {
        let statement = Statement {
            db,
            policy: *policy,
        };
        Self {
            statement,
            turn,
            sender: OnceLock::new(),
            metrics,
        }
    }

    /// Runs `request` in the next shared claim statement; `deadline` is when its budget ends.
    pub(super) async fn claim(
        &self,
        request: ClaimRequest,
        deadline: Option<Instant>,
    ) -> SharedClaim {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            let statement = self.statement.clone();
            tokio::spawn(claim_loop(
                statement,
                self.turn.clone(),
                self.metrics.clone(),
                receiver,
            ));
            sender
        });
        let pending = Pending {
            request,
            deadline,
            reply,
        };
        if sender.send(pending).is_err() {
            // The loop's runtime shut down (a store shared across test runtimes).
            return None;
        }
        answer.await.unwrap_or(None)
    }
}

/// What every claim of a statement shares.
#[derive(Clone)]
struct Statement {
    db: Db,
    policy: StorePolicy,
}

async fn claim_loop(
    statement: Statement,
    turn: Arc<Semaphore>,
    metrics: Arc<OnceLock<Metrics>>,
    mut receiver: mpsc::UnboundedReceiver<Pending>,
) {
    while let Some((_turn, batch)) = next_batch(&mut receiver, &turn, MAX_CLAIMS).await {
        if let Some(metrics) = metrics.get() {
            metrics.shared_statement("claim", batch.len());
        }
        claim_batch(&statement, batch).await;
    }
}

/// One statement for the batch; every claim gets its rows, or is told to run alone.
/// Claims go in the order they arrived: the statement deals the best tasks to the earliest
/// (and locks the runtimes' rows in id order itself, so two replicas' statements cannot
/// deadlock there).
async fn claim_batch(statement: &Statement, batch: Vec<Pending>) {
    let now = Instant::now();
    let (mut claims, mut replies) = (Vec::new(), Vec::new());
    for pending in batch {
        match remaining(pending.deadline, now) {
            // Out of time while waiting: alone, it gets its own verdict at once.
            Some(Duration::ZERO) => {
                let _ = pending.reply.send(None);
            }
            budget => {
                claims.push(ClaimRequest {
                    budget,
                    ..pending.request
                });
                replies.push(pending.reply);
            }
        }
    }
    if claims.is_empty() {
        return;
    }
    match claim_many(&statement.db, &statement.policy, &claims).await {
        Ok(rows) => {
            let mut answers: Vec<Vec<TaskRow>> = claims.iter().map(|_| Vec::new()).collect();
            for row in rows {
                let answer = usize::try_from(row.request - 1)
                    .ok()
                    .and_then(|index| answers.get_mut(index));
                match answer {
                    Some(answer) => answer.push(row.task),
                    // Cannot happen: the statement numbers the claims it was given.
                    None => tracing::error!(request = row.request, "a claimed row of no claim"),
                }
            }
            for (reply, rows) in replies.into_iter().zip(answers) {
                let _ = reply.send(Some(rows));
            }
        }
        Err(error) => {
            tracing::debug!(%error, claims = claims.len(), "a shared claim failed; each runs alone");
            for reply in replies {
                let _ = reply.send(None);
            }
        }
    }
}

/// Time left before `deadline` (zero once it passed); `None` without one.
pub(super) fn remaining(deadline: Option<Instant>, now: Instant) -> Option<Duration> {
    deadline.map(|deadline| deadline.saturating_duration_since(now))
}
