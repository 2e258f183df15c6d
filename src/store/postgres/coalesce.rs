//! Group commit for the two owner writes every task makes: `StartTask` and `CompleteTask`.
//!
//! Each kind has one writer loop. A write that arrives while the replica is idle goes out at
//! once, alone; writes that arrive while a statement is in flight wait for it and then share
//! the next one, `UPDATE … FROM unnest(ids, tokens[, results])`, whose guard is the
//! single-row statement's, judged per row. So a quiet server pays one channel hop per write,
//! and a busy one pays one statement (one plan, one commit, one WAL flush) for as many writes
//! as arrived during the previous statement, which is what moves the bottleneck off
//! PostgreSQL's CPU.
//!
//! **One write turn per replica.** Starts, completes and shared claims (`shared_claims`) take
//! turns: one of their statements runs at a time ([`next_batch`]). Measured on two cores,
//! three statements at once only competed for the same CPU and index pages; taking turns,
//! each statement carries what arrived during the others, and PostgreSQL's CPU per task fell
//! by a fifth to a third in every lifecycle (docs/PERFORMANCE.md). Batches grow with load
//! (up to [`MAX_BATCH`] writes, 64 claims), so a replica's ceiling rises with it; replicas
//! add turns. Nothing waits for the turn while holding a row lock, so taking turns cannot
//! deadlock inside a replica.
//!
//! The loop only ever runs a guarded statement: a row its guard did not match is answered
//! "not applied", and the caller judges it with the fence as it does for its own statement.
//! When the shared statement fails (a deadlock with the sweeper, a lost connection) or the
//! loop is gone, every caller is told to run its own statement instead, so the loop can make
//! a write slower but never changes what it does.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use super::pooler::{Db, run};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use uuid::Uuid;

use super::rows::TaskRow;
use crate::domain::{ClaimToken, RuntimeId, TaskId};
use crate::telemetry::metrics::Metrics;

/// Most writes in one statement; more wait for the next one.
const MAX_BATCH: usize = 256;

/// What a coalesced write came back with.
pub(super) enum Shared {
    /// The guard matched: the row as written.
    Applied(Box<TaskRow>),
    /// The guard did not match this row (or the same task was asked twice in one batch).
    NotApplied,
    /// The shared statement did not run; the caller runs its own.
    RunAlone,
}

/// One kind of write that can share a statement.
pub(super) trait SharedWrite: Send + 'static {
    /// The `kind` label of its metrics.
    const KIND: &'static str;

    fn task_id(&self) -> Uuid;
    /// Runs the writes as one statement, answering the rows whose guard matched.
    fn run(db: &Db, writes: &[Self]) -> impl Future<Output = sqlx::Result<Vec<TaskRow>>> + Send
    where
        Self: Sized;
}

pub(super) struct Start {
    task_id: Uuid,
    token: Uuid,
    /// The runtime whose own token made the call (spec §9); `None`: any holder.
    holder: Option<Uuid>,
}

impl Start {
    pub(super) fn new(task_id: TaskId, token: ClaimToken, acting: Option<RuntimeId>) -> Self {
        Self {
            task_id: task_id.as_uuid(),
            token: token.as_uuid(),
            holder: acting.map(|runtime| runtime.as_uuid()),
        }
    }
}

pub(super) struct Complete {
    task_id: Uuid,
    token: Uuid,
    result: Vec<u8>,
    holder: Option<Uuid>,
}

impl Complete {
    pub(super) fn new(
        task_id: TaskId,
        token: ClaimToken,
        result: &[u8],
        acting: Option<RuntimeId>,
    ) -> Self {
        Self {
            task_id: task_id.as_uuid(),
            token: token.as_uuid(),
            result: result.to_vec(),
            holder: acting.map(|runtime| runtime.as_uuid()),
        }
    }
}

/// Runs `write` as its statement with nothing else in it; the row when its guard matched.
pub(super) async fn alone<W: SharedWrite>(db: &Db, write: W) -> sqlx::Result<Option<TaskRow>> {
    let rows = W::run(db, std::slice::from_ref(&write)).await?;
    Ok(rows.into_iter().next())
}

impl SharedWrite for Start {
    const KIND: &'static str = "start";

    fn task_id(&self) -> Uuid {
        self.task_id
    }

    async fn run(db: &Db, writes: &[Self]) -> sqlx::Result<Vec<TaskRow>> {
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = writes
            .iter()
            .map(|write| (write.task_id, write.token))
            .unzip();
        let holders: Vec<Option<Uuid>> = writes.iter().map(|write| write.holder).collect();
        run!(
            db,
            sqlx::query_as(super::sql::START_MANY)
                .bind(ids)
                .bind(tokens)
                .bind(holders),
            fetch_all
        )
        .await
    }
}

impl SharedWrite for Complete {
    const KIND: &'static str = "complete";

    fn task_id(&self) -> Uuid {
        self.task_id
    }

    async fn run(db: &Db, writes: &[Self]) -> sqlx::Result<Vec<TaskRow>> {
        let ids: Vec<Uuid> = writes.iter().map(|write| write.task_id).collect();
        let tokens: Vec<Uuid> = writes.iter().map(|write| write.token).collect();
        let results: Vec<&[u8]> = writes.iter().map(|write| &write.result[..]).collect();
        let holders: Vec<Option<Uuid>> = writes.iter().map(|write| write.holder).collect();
        run!(
            db,
            sqlx::query_as(super::sql::COMPLETE_MANY)
                .bind(ids)
                .bind(tokens)
                .bind(results)
                .bind(holders),
            fetch_all
        )
        .await
    }
}

struct Pending<W> {
    write: W,
    reply: oneshot::Sender<Shared>,
}

/// The writer loop of one kind, started by the first write (so it runs on the caller's
/// runtime) and ended when the store is dropped.
pub(super) struct Coalescer<W> {
    db: Db,
    turn: Arc<Semaphore>,
    sender: OnceLock<mpsc::UnboundedSender<Pending<W>>>,
    /// Where the statements' sizes are counted, once a server took the store.
    metrics: Arc<OnceLock<Metrics>>,
}

impl<W: SharedWrite> Coalescer<W> {
    pub(super) fn new(db: Db, turn: Arc<Semaphore>, metrics: Arc<OnceLock<Metrics>>) -> Self {
        Self {
            db,
            turn,
            sender: OnceLock::new(),
            metrics,
        }
    }

    /// Runs `write` in the next shared statement of its kind.
    pub(super) async fn write(&self, write: W) -> Shared {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(write_loop(
                self.db.clone(),
                self.turn.clone(),
                self.metrics.clone(),
                receiver,
            ));
            sender
        });
        if sender.send(Pending { write, reply }).is_err() {
            // The loop's runtime shut down (a store shared across test runtimes).
            return Shared::RunAlone;
        }
        answer.await.unwrap_or(Shared::RunAlone)
    }
}

async fn write_loop<W: SharedWrite>(
    db: Db,
    turn: Arc<Semaphore>,
    metrics: Arc<OnceLock<Metrics>>,
    mut receiver: mpsc::UnboundedReceiver<Pending<W>>,
) {
    while let Some((_turn, batch)) = next_batch(&mut receiver, &turn, MAX_BATCH).await {
        if let Some(metrics) = metrics.get() {
            metrics.shared_statement(W::KIND, batch.len());
        }
        write_batch(&db, batch).await;
    }
}

/// The next batch of at most `max`, with the replica's write turn: waits for a first item,
/// then for the turn (the statement of another kind may be running), then takes what arrived
/// meanwhile too. `None`: the channel closed.
pub(super) async fn next_batch<T>(
    receiver: &mut mpsc::UnboundedReceiver<T>,
    turn: &Arc<Semaphore>,
    max: usize,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    let mut batch = Vec::new();
    if receiver.recv_many(&mut batch, max).await == 0 {
        return None;
    }
    let permit = turn.clone().acquire_owned().await.ok()?;
    while batch.len() < max {
        match receiver.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some((permit, batch))
}

/// One statement for the batch; every writer gets its answer.
async fn write_batch<W: SharedWrite>(db: &Db, mut batch: Vec<Pending<W>>) {
    // Rows are locked in one fixed order (by id), which keeps a shared statement from
    // deadlocking with another one.
    batch.sort_by_key(|pending| pending.write.task_id());
    let mut writes: Vec<W> = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for pending in batch {
        // A task asked twice (a retried start racing its first try) sits out this statement:
        // the fence judges it after the first one landed.
        if writes
            .last()
            .is_some_and(|last| last.task_id() == pending.write.task_id())
        {
            let _ = pending.reply.send(Shared::NotApplied);
        } else {
            writes.push(pending.write);
            replies.push(pending.reply);
        }
    }
    match W::run(db, &writes).await {
        Ok(rows) => {
            let mut applied: HashMap<Uuid, TaskRow> =
                rows.into_iter().map(|row| (row.id(), row)).collect();
            for (write, reply) in writes.iter().zip(replies) {
                let answer = match applied.remove(&write.task_id()) {
                    Some(row) => Shared::Applied(Box::new(row)),
                    None => Shared::NotApplied,
                };
                let _ = reply.send(answer);
            }
        }
        Err(error) => {
            tracing::debug!(%error, writes = writes.len(), "a shared write failed; each runs alone");
            for reply in replies {
                let _ = reply.send(Shared::RunAlone);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_arriving_while_another_statement_has_the_turn_go_together() {
        let turn = Arc::new(Semaphore::new(1));
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let other_statement = turn.clone().acquire_owned().await.unwrap();
        sender.send(1).unwrap();
        let next = tokio::spawn({
            let turn = turn.clone();
            async move {
                next_batch(&mut receiver, &turn, 3)
                    .await
                    .map(|(_, batch)| batch)
            }
        });
        tokio::task::yield_now().await;
        for write in 2..=4 {
            sender.send(write).unwrap();
        }
        assert!(!next.is_finished(), "the batch went out without the turn");
        drop(other_statement);
        // At most three: the fourth waits for the next statement.
        assert_eq!(next.await.unwrap(), Some(vec![1, 2, 3]));
    }

    #[tokio::test]
    async fn a_write_at_a_quiet_replica_goes_out_at_once_and_a_closed_channel_ends_the_loop() {
        let turn = Arc::new(Semaphore::new(1));
        let (sender, mut receiver) = mpsc::unbounded_channel();
        sender.send("alone").unwrap();
        let (held, batch) = next_batch(&mut receiver, &turn, 256).await.unwrap();
        assert_eq!(batch, vec!["alone"]);
        assert_eq!(turn.available_permits(), 0, "the statement holds the turn");
        drop(held);
        drop(sender);
        assert!(next_batch(&mut receiver, &turn, 256).await.is_none());
    }
}
