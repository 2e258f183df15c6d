//! The sweeper's stages on PostgreSQL (spec §6). Every stage works in batches: one statement
//! picks up to `batch_size` rows `FOR UPDATE SKIP LOCKED` and changes them with its predicates
//! re-checked, repeated until a batch comes back short.
//!
//! One replica sweeps at a time: the one holding the lease in the `leadership` table (migration
//! 18), renewed at every sweep and given up at shutdown. A leader that stops renewing loses it
//! after [`leadership_lease`]; should two sweeps ever overlap (a sweep outlasting the lease),
//! every stage is still correct: rows are taken `FOR UPDATE SKIP LOCKED` with their predicates
//! re-checked, and the tally serializes on its progress row.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use uuid::Uuid;

use super::errors::plain;
use super::interval;
use super::pooler::{Db, run_on};
use super::rows::{self, MoveRow};
use super::sql;
use crate::domain::liveness;
use crate::domain::{FailureReason, Result, RuntimeId};
use crate::store::{LivenessOracle, StorePolicy, SweepPolicy, SweepReport, TaskMove};

/// How long a sweep's leadership lasts without renewal: three sweep intervals, so a leader
/// that is merely slow keeps it, and within bounds so a crashed one is replaced soon.
pub(super) fn leadership_lease(interval: Duration) -> Duration {
    (interval * 3).clamp(Duration::from_secs(5), Duration::from_secs(5 * 60))
}

/// The sweeper's identity in the `leadership` table, and the epoch it last led in.
pub(super) struct Leader {
    pub(super) holder: Uuid,
    pub(super) epoch: std::sync::atomic::AtomicI64,
}

/// Most batches one stage runs in one sweep, so a sweep always ends; what is left waits for
/// the next tick.
const MAX_BATCHES_PER_STAGE: usize = 64;

/// How far behind now the finished-task tally stays: longer than any transaction that finishes
/// tasks lasts (each is one statement, bounded by the statement timeout), so a row finished
/// before the watermark but committed after it cannot exist.
const TALLY_SETTLE: Duration = Duration::from_secs(5 * 60);
/// How far short of now the console's per-minute counts stop: a chart may miss a task whose
/// finishing transaction took longer (the statement timeout bounds most), never count one twice.
const MINUTES_SETTLE: Duration = Duration::from_secs(10);

/// The stage-specific parameter ($6) of a server-side failure statement.
#[derive(Clone, Copy)]
pub(super) enum StageArgument {
    Runtime(Option<Uuid>),
    Age(Duration),
    Nothing,
}

pub(super) async fn run(
    db: &Db,
    leader: &Leader,
    store_policy: &StorePolicy,
    policy: &SweepPolicy,
    oracle: &dyn LivenessOracle,
    due_since: Option<DateTime<Utc>>,
) -> Result<Option<SweepReport>> {
    let mut conn = db.pool().acquire().await.map_err(plain)?;
    let try_lead = sqlx::query_as(sql::TRY_LEAD)
        .bind(leader.holder)
        .bind(interval(leadership_lease(policy.interval)));
    let led: Option<(i64, DateTime<Utc>)> = run_on!(db, &mut conn, try_lead, fetch_optional)
        .await
        .map_err(plain)?;
    let Some((epoch, swept_at)) = led else {
        return Ok(None);
    };
    let previous = leader
        .epoch
        .swap(epoch, std::sync::atomic::Ordering::Relaxed);
    if previous != epoch {
        tracing::info!(epoch, holder = %leader.holder, "this replica now leads the sweep");
    }
    let mut sweep = Sweep {
        db,
        conn,
        store_policy,
        policy,
    };
    let mut report = SweepReport {
        swept_at: Some(swept_at),
        ..SweepReport::default()
    };
    let mut failed = Vec::new();
    // Each stage on its own (spec §10): one that fails is logged and counted, and the ones
    // after it still run. Every statement commits alone, so a failed one leaves nothing open.
    isolated(
        &mut failed,
        "blackout_credit",
        sweep.credit_blackout().await,
    );
    report.marked_offline = isolated(
        &mut failed,
        "mark_offline",
        sweep.mark_stale_runtimes_offline(oracle).await,
    );
    report.runtime_offline = isolated(
        &mut failed,
        "runtime_offline",
        sweep
            .fail_in_batches(
                sql::FAIL_OFFLINE_RUNTIME_TASKS,
                FailureReason::RuntimeOffline,
                "the runtime holding the task went offline",
                StageArgument::Nothing,
            )
            .await,
    );
    report.timed_out = isolated(
        &mut failed,
        "dispatch_timeout",
        sweep
            .fail_in_batches(
                sql::FAIL_DISPATCH_TIMEOUTS,
                FailureReason::DispatchTimeout,
                "the task was dispatched but not started within the dispatch timeout",
                StageArgument::Age(policy.dispatch_timeout),
            )
            .await,
    );
    report.timed_out.extend(isolated(
        &mut failed,
        "execution_timeout",
        sweep
            .fail_in_batches(
                sql::FAIL_EXECUTION_TIMEOUTS,
                FailureReason::ExecutionTimeout,
                "the task ran longer than its execution timeout",
                StageArgument::Nothing,
            )
            .await,
    ));
    report.timed_out.extend(isolated(
        &mut failed,
        "queue_execution_timeout",
        sweep
            .fail_in_batches(
                sql::FAIL_QUEUE_DEFAULT_EXECUTION_TIMEOUTS,
                FailureReason::ExecutionTimeout,
                "the task ran longer than its queue's default execution timeout",
                StageArgument::Nothing,
            )
            .await,
    ));
    report.runtime_gone = isolated(
        &mut failed,
        "runtime_gone",
        sweep.fail_pinned_orphans().await,
    );
    if let Some(since) = due_since {
        report.became_available = isolated(
            &mut failed,
            "became_available",
            sweep.became_available(since, swept_at).await,
        );
    }
    if let Some(retain) = policy.retain_finished {
        report.deleted_finished = isolated(
            &mut failed,
            "retention",
            sweep.delete_finished(retain).await,
        );
    }
    isolated(&mut failed, "finished_tally", sweep.tally_finished().await);
    isolated(&mut failed, "queue_minutes", sweep.count_minutes().await);
    Ok(Some(report))
}

/// A stage's outcome, or nothing when it failed (logged, and named in `failed`).
fn isolated<T: Default>(
    failed: &mut Vec<&'static str>,
    stage: &'static str,
    outcome: Result<T>,
) -> T {
    outcome.unwrap_or_else(|error| {
        failed.push(stage);
        tracing::warn!(stage, %error, "a sweeper stage failed; the other stages still run");
        T::default()
    })
}

struct Sweep<'a> {
    db: &'a Db,
    conn: PoolConnection<Postgres>,
    store_policy: &'a StorePolicy,
    policy: &'a SweepPolicy,
}

impl Sweep<'_> {
    fn batch_size(&self) -> i64 {
        i64::from(self.policy.batch_size.max(1))
    }

    /// Before stage 1: a gap since the previous sweep longer than usual (no replica could
    /// sweep) does not count against ONLINE runtimes (`domain::liveness::blackout_credit`).
    async fn credit_blackout(&mut self) -> Result<()> {
        let gap_ms: Option<f64> = run_on!(
            self.db,
            &mut self.conn,
            sqlx::query_scalar(sql::RECORD_SWEEP_START),
            fetch_one
        )
        .await
        .map_err(plain)?;
        let gap = gap_ms.map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
        let Some(credit) = gap.and_then(|gap| liveness::blackout_credit(gap, self.policy.interval))
        else {
            return Ok(());
        };
        tracing::warn!(
            ?credit,
            "no sweep ran for a while: runtimes are not held responsible for that time"
        );
        run_on!(
            self.db,
            &mut self.conn,
            sqlx::query(sql::CREDIT_BLACKOUT).bind(interval(credit)),
            execute
        )
        .await
        .map_err(plain)?;
        Ok(())
    }

    /// Stage 1. For runtimes whose `last_seen_at` is stale, Redis is asked what it saw, and
    /// `domain::liveness::verdict` decides. The flip re-checks staleness, so a heartbeat that
    /// landed meanwhile vetoes it. A runtime Redis saw recently gets its `last_seen_at` moved
    /// to when Redis saw it.
    async fn mark_stale_runtimes_offline(
        &mut self,
        oracle: &dyn LivenessOracle,
    ) -> Result<Vec<RuntimeId>> {
        let threshold = self.policy.offline_after;
        let mut marked = Vec::new();
        let mut undecided: Vec<Uuid> = Vec::new();
        let batch_size = self.batch_size();
        for _ in 0..MAX_BATCHES_PER_STAGE {
            let stale: Vec<(Uuid, f64)> = run_on!(
                self.db,
                &mut self.conn,
                sqlx::query_as(sql::STALE_RUNTIMES)
                    .bind(interval(threshold))
                    .bind(batch_size)
                    .bind(&undecided),
                fetch_all
            )
            .await
            .map_err(plain)?;
            let ids: Vec<RuntimeId> = stale
                .iter()
                .map(|(id, _)| RuntimeId::from_uuid(*id))
                .collect();
            let redis = oracle.view(&ids).await;
            let (mut alive, mut dead) = (Vec::new(), Vec::new());
            for (id, age_ms) in &stale {
                let age = Duration::from_secs_f64(age_ms.max(0.0) / 1000.0);
                match liveness::verdict(RuntimeId::from_uuid(*id), age, &redis, threshold) {
                    liveness::Verdict::Alive { seen_ago } => {
                        alive.push((*id, seen_ago.as_secs_f64() * 1000.0));
                    }
                    liveness::Verdict::Offline => dead.push(*id),
                    liveness::Verdict::Undecided => undecided.push(*id),
                }
            }
            self.refresh_last_seen(alive).await?;
            let flipped: Vec<Uuid> = run_on!(
                self.db,
                &mut self.conn,
                sqlx::query_scalar(sql::MARK_OFFLINE)
                    .bind(dead)
                    .bind(interval(threshold)),
                fetch_all
            )
            .await
            .map_err(plain)?;
            marked.extend(flipped.into_iter().map(RuntimeId::from_uuid));
            if (stale.len() as i64) < self.batch_size() {
                break;
            }
        }
        Ok(marked)
    }

    async fn refresh_last_seen(&mut self, alive: Vec<(Uuid, f64)>) -> Result<()> {
        if alive.is_empty() {
            return Ok(());
        }
        let (ids, ages_ms): (Vec<Uuid>, Vec<f64>) = alive.into_iter().unzip();
        run_on!(
            self.db,
            &mut self.conn,
            sqlx::query(sql::REFRESH_LAST_SEEN).bind(ids).bind(ages_ms),
            execute
        )
        .await
        .map_err(plain)?;
        Ok(())
    }

    async fn fail_in_batches(
        &mut self,
        statement: &'static str,
        reason: FailureReason,
        error: &str,
        argument: StageArgument,
    ) -> Result<Vec<TaskMove>> {
        let mut moved = Vec::new();
        let batch_size = self.batch_size();
        for _ in 0..MAX_BATCHES_PER_STAGE {
            let query = fail_for_server_reason(
                self.store_policy,
                statement,
                reason,
                error,
                argument,
                batch_size,
            );
            let rows = run_on!(self.db, &mut self.conn, query, fetch_all)
                .await
                .map_err(plain)?;
            let batch = rows::moves(rows)?;
            let short = (batch.len() as i64) < batch_size;
            moved.extend(batch);
            if short {
                break;
            }
        }
        Ok(moved)
    }

    /// Retention (spec §11), oldest first, a batch per statement.
    async fn delete_finished(&mut self, retain: Duration) -> Result<u64> {
        let mut deleted = 0;
        let batch_size = self.batch_size();
        for _ in 0..MAX_BATCHES_PER_STAGE {
            let batch: i64 = run_on!(
                self.db,
                &mut self.conn,
                sqlx::query_scalar(sql::DELETE_EXPIRED_FINISHED)
                    .bind(interval(retain))
                    .bind(batch_size),
                fetch_one
            )
            .await
            .map_err(plain)?;
            deleted += batch.unsigned_abs();
            if batch < self.batch_size() {
                break;
            }
        }
        Ok(deleted)
    }

    /// Counts newly finished tasks into the per-queue tally DescribeQueue reads (migration 16).
    async fn tally_finished(&mut self) -> Result<()> {
        let mut transaction = self.db.begin_on(&mut self.conn).await.map_err(plain)?;
        sqlx::query(sql::LOCK_TALLY)
            .execute(&mut *transaction)
            .await
            .map_err(plain)?;
        sqlx::query(sql::TALLY_FINISHED)
            .persistent(self.db.prepares())
            .bind(interval(TALLY_SETTLE))
            .execute(&mut *transaction)
            .await
            .map_err(plain)?;
        transaction.commit().await.map_err(plain)
    }

    /// The console's per-minute counts (migration 20).
    async fn count_minutes(&mut self) -> Result<()> {
        run_on!(
            self.db,
            &mut self.conn,
            sqlx::query(sql::COUNT_MINUTES).bind(interval(MINUTES_SETTLE)),
            execute
        )
        .await
        .map_err(plain)?;
        Ok(())
    }

    /// Stage 4.
    async fn fail_pinned_orphans(&mut self) -> Result<Vec<TaskMove>> {
        let mut moved = Vec::new();
        let batch_size = self.batch_size();
        for _ in 0..MAX_BATCHES_PER_STAGE {
            let rows: Vec<MoveRow> = run_on!(
                self.db,
                &mut self.conn,
                sqlx::query_as(sql::FAIL_PINNED_ORPHANS)
                    .bind(batch_size)
                    .bind(interval(self.policy.pinned_orphan_grace)),
                fetch_all
            )
            .await
            .map_err(plain)?;
            let short = (rows.len() as i64) < self.batch_size();
            moved.extend(rows::moves(rows)?);
            if short {
                break;
            }
        }
        Ok(moved)
    }

    /// Stage 5.
    async fn became_available(
        &mut self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<TaskMove>> {
        let rows: Vec<MoveRow> = run_on!(
            self.db,
            &mut self.conn,
            sqlx::query_as(sql::BECAME_AVAILABLE)
                .bind(since)
                .bind(until),
            fetch_all
        )
        .await
        .map_err(plain)?;
        rows::moves(rows)
    }
}

/// One batch of a `sql::fail_for_server_reason!` statement, ready to run.
pub(super) fn fail_for_server_reason<'q>(
    store_policy: &StorePolicy,
    statement: &'static str,
    reason: FailureReason,
    error: &'q str,
    argument: StageArgument,
    limit: i64,
) -> QueryAs<'q, Postgres, MoveRow, PgArguments> {
    let backoff = store_policy.retry_backoff;
    let query = sqlx::query_as(statement)
        .bind(limit)
        .bind(backoff.base.as_secs_f64() * 1000.0)
        .bind(backoff.max.as_secs_f64() * 1000.0)
        .bind(reason.as_str())
        .bind(error);
    match argument {
        StageArgument::Runtime(runtime) => query.bind(runtime),
        StageArgument::Age(age) => query.bind(interval(age)),
        StageArgument::Nothing => query,
    }
}
