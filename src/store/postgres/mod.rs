//! The PostgreSQL store. Each operation is one statement on its happy path; a fenced write
//! that matched no row costs one more read to say why (or to answer a replay).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::fence::{self, OwnerWrite, Verdict};
use crate::domain::{
    ClaimToken, ClaimedTask, Error, FailureReason, QueueInfo, Result, Runtime, RuntimeId,
    RuntimeStatus, StatusCounts, Task, TaskId, TaskStatus,
};
use crate::store::{
    Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome, Failure,
    HeartbeatAck, LeaseRenewal, LivenessOracle, NewApiKey, NewRuntime, NewTask, PageCursor,
    QueueDepth, QueueUpdate, REMEMBERED_REVOKED_TOKENS, Recovered, RuntimeCredential, StorePolicy,
    SweepPolicy, SweepReport, TaskFilter, TaskMove, TaskPage, TaskStore,
};

mod coalesce;
mod credentials;
mod errors;
pub mod pooler;
mod rows;
pub mod schema;
mod sql;
mod sweep;

use coalesce::{Coalescer, Shared};
use errors::{Context, classify, plain};
use pooler::{Db, Route, run};
use rows::{FenceSnapshot, HorizonRow, MoveRow, QueueRow, RuntimeRow, TaskRow, to_u32, to_u64};
use sweep::StageArgument;

/// Statements tests examine with EXPLAIN.
#[doc(hidden)]
pub mod statements {
    pub const DESCRIBE_QUEUE: &str = super::sql::DESCRIBE_QUEUE;
    pub const QUEUE_DEPTHS: &str = super::sql::QUEUE_DEPTHS;
}

/// A duration as PostgreSQL's INTERVAL can hold it: whole microseconds (sqlx refuses to
/// encode finer ones).
fn interval(duration: Duration) -> Duration {
    Duration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}

/// A small pool to the same database as `pool`, connecting lazily. Its connections sit idle
/// most of the time, so each is checked before use (sqlx's default).
fn side_pool(pool: &PgPool, connections: u32, acquire_timeout: Duration) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(acquire_timeout)
        .connect_lazy_with((*pool.connect_options()).clone())
}

/// A fenced write that matched no row is re-judged; if the judgement says it should have
/// applied (the row moved between the two statements), it is tried again this many times.
const FENCED_WRITE_ATTEMPTS: usize = 3;

/// Connections kept for liveness (heartbeats and other signs of life) and for the sweeper,
/// apart from the request pool: a flood of claims cannot starve either (spec §10).
const LIVENESS_CONNECTIONS: u32 = 3;
const SWEEPER_CONNECTIONS: u32 = 2;

/// A heartbeat that Redis recorded answers rather than wait long for an unreachable
/// database; the sweeper can wait as long as requests do.
const LIVENESS_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct PgStore {
    /// Requests.
    db: Db,
    /// Heartbeats and the signs of life of other calls.
    liveness: Db,
    /// The sweep.
    sweeper: Db,
    leader: sweep::Leader,
    policy: StorePolicy,
    starts: Coalescer<coalesce::Start>,
    completes: Coalescer<coalesce::Complete>,
}

/// The owner writes that run as one guarded statement.
enum GuardedWrite<'a> {
    Start,
    ExtendLease(Duration),
    Complete(&'a [u8]),
    Fail(&'a Failure),
}

impl GuardedWrite<'_> {
    fn kind(&self) -> OwnerWrite {
        match self {
            GuardedWrite::Start => OwnerWrite::Start,
            GuardedWrite::ExtendLease(_) => OwnerWrite::ExtendLease,
            GuardedWrite::Complete(_) => OwnerWrite::Complete,
            GuardedWrite::Fail(_) => OwnerWrite::Fail,
        }
    }
}

/// What a guarded statement returned.
enum Applied {
    Task(Box<Task>),
    Lease(LeaseRenewal),
}

/// How a fenced write ended when it did not fail.
enum Fenced {
    Applied(Applied),
    /// A replay: the same write already applied with this token. Carries the current row.
    Replayed(Box<Task>),
}

impl PgStore {
    /// `pool` serves requests; the liveness and sweeper connections are opened beside it,
    /// with the same settings, when first needed. Statements go straight to PostgreSQL.
    pub fn new(pool: PgPool, policy: StorePolicy) -> Self {
        Self::routed(pool, policy, Route::Direct)
    }

    /// [`PgStore::new`], with statements taking `route` (e.g. through a transaction pooler).
    pub fn routed(pool: PgPool, policy: StorePolicy, route: Route) -> Self {
        let db = Db::new(pool, route);
        let pool = db.pool();
        Self {
            starts: Coalescer::new(db.clone()),
            completes: Coalescer::new(db.clone()),
            liveness: db.with_pool(side_pool(
                pool,
                LIVENESS_CONNECTIONS,
                LIVENESS_ACQUIRE_TIMEOUT,
            )),
            sweeper: db.with_pool(side_pool(
                pool,
                SWEEPER_CONNECTIONS,
                pool.options().get_acquire_timeout(),
            )),
            leader: sweep::Leader {
                holder: Uuid::new_v4(),
                epoch: std::sync::atomic::AtomicI64::new(0),
            },
            db,
            policy,
        }
    }

    /// Runs the guarded statement for `write`; when it matches no row, reads the row and lets
    /// the fence say whether this was a replay or why it is refused.
    async fn fenced(
        &self,
        write: GuardedWrite<'_>,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Fenced> {
        for attempt in 0..FENCED_WRITE_ATTEMPTS {
            let applied = if attempt == 0 {
                self.try_shared(&write, task_id, token, acting).await?
            } else {
                self.try_guarded(&write, task_id, token, acting).await?
            };
            if let Some(applied) = applied {
                return Ok(Fenced::Applied(applied));
            }
            let (task, now) = self.fence_snapshot(task_id).await?;
            let verdict = fence::judge(write.kind(), &task, token, now);
            if verdict != Verdict::Replay && fence::held_by_another(&task, acting) {
                return Err(Error::RuntimeMismatch);
            }
            match verdict {
                Verdict::Apply => continue,
                Verdict::Replay => return Ok(Fenced::Replayed(Box::new(task))),
                Verdict::Refuse(refusal) => return Err(Error::refused(refusal, &task)),
            }
        }
        Err(Error::Internal(
            "a fenced write kept racing with concurrent changes".into(),
        ))
    }

    /// The guarded statement, shared with concurrent writes of its kind where it can be (see
    /// [`coalesce`]); `None` when its guard matched no row.
    async fn try_shared(
        &self,
        write: &GuardedWrite<'_>,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Option<Applied>> {
        let shared = match write {
            GuardedWrite::Start => {
                self.starts
                    .write(coalesce::Start::new(task_id, token, acting))
                    .await
            }
            GuardedWrite::Complete(result) => {
                let write = coalesce::Complete::new(task_id, token, result, acting);
                self.completes.write(write).await
            }
            GuardedWrite::ExtendLease(_) | GuardedWrite::Fail(_) => Shared::RunAlone,
        };
        match shared {
            Shared::Applied(row) => applied_task(Ok(Some(*row))),
            Shared::NotApplied => Ok(None),
            Shared::RunAlone => self.try_guarded(write, task_id, token, acting).await,
        }
    }

    /// One guarded statement; `None` when its guard matched no row.
    async fn try_guarded(
        &self,
        write: &GuardedWrite<'_>,
        task_id: TaskId,
        claim_token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Option<Applied>> {
        let (task, token) = (task_id.as_uuid(), claim_token.as_uuid());
        let holder = acting.map(|runtime| runtime.as_uuid());
        match write {
            GuardedWrite::Start => {
                let write = coalesce::Start::new(task_id, claim_token, acting);
                applied_task(coalesce::alone(&self.db, write).await)
            }
            GuardedWrite::Complete(result) => {
                let write = coalesce::Complete::new(task_id, claim_token, result, acting);
                applied_task(coalesce::alone(&self.db, write).await)
            }
            GuardedWrite::Fail(failure) => {
                let backoff = self.policy.retry_backoff;
                let row = run!(
                    &self.db,
                    sqlx::query_as(sql::FAIL)
                        .bind(task)
                        .bind(token)
                        .bind(&failure.error)
                        .bind(failure.retryable)
                        .bind(backoff.base.as_secs_f64() * 1000.0)
                        .bind(backoff.max.as_secs_f64() * 1000.0)
                        .bind(failure.jitter)
                        .bind(holder),
                    fetch_optional
                )
                .await;
                applied_task(row)
            }
            GuardedWrite::ExtendLease(extend_by) => {
                let renewed: Option<(DateTime<Utc>, Option<Uuid>)> = run!(
                    &self.db,
                    sqlx::query_as(sql::EXTEND_LEASE)
                        .bind(task)
                        .bind(token)
                        .bind(interval(*extend_by))
                        .bind(holder),
                    fetch_optional
                )
                .await
                .map_err(plain)?;
                Ok(renewed.map(|(lease_expires_at, holder)| {
                    Applied::Lease(LeaseRenewal {
                        lease_expires_at,
                        runtime_id: holder.map(RuntimeId::from_uuid),
                    })
                }))
            }
        }
    }

    async fn fence_snapshot(&self, task_id: TaskId) -> Result<(Task, DateTime<Utc>)> {
        let snapshot: Option<FenceSnapshot> = run!(
            &self.db,
            sqlx::query_as(sql::FENCE_SNAPSHOT).bind(task_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let snapshot = snapshot.ok_or(Error::TaskNotFound(task_id))?;
        Ok((snapshot.task.try_into()?, snapshot.db_now))
    }

    /// The tasks already holding the idempotency keys of `tasks` that were not inserted.
    async fn existing_by_idempotency_key(
        &self,
        tasks: &[NewTask],
        inserted: &HashMap<TaskId, Task>,
    ) -> Result<HashMap<(String, String), Task>> {
        let inserted_keys: HashSet<(&str, &str)> = inserted
            .values()
            .filter_map(|task| Some((task.queue.as_str(), task.idempotency_key.as_deref()?)))
            .collect();
        let (queues, keys): (Vec<String>, Vec<String>) = tasks
            .iter()
            .filter_map(|task| Some((task.queue.clone(), task.idempotency_key.clone()?)))
            .filter(|(queue, key)| !inserted_keys.contains(&(queue.as_str(), key.as_str())))
            .unzip();
        if queues.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<TaskRow> = run!(
            &self.db,
            sqlx::query_as(sql::BY_IDEMPOTENCY_KEYS)
                .bind(&queues)
                .bind(&keys),
            fetch_all
        )
        .await
        .map_err(plain)?;
        rows.into_iter()
            .map(|row| {
                let task = Task::try_from(row)?;
                let key = task.idempotency_key.clone().unwrap_or_default();
                Ok(((task.queue.clone(), key), task))
            })
            .collect()
    }

    async fn require_runtime(&self, runtime_id: RuntimeId) -> Result<()> {
        let exists: bool = run!(
            &self.db,
            sqlx::query_scalar(sql::RUNTIME_EXISTS).bind(runtime_id.as_uuid()),
            fetch_one
        )
        .await
        .map_err(plain)?;
        if exists {
            Ok(())
        } else {
            Err(Error::RuntimeNotFound(runtime_id))
        }
    }

    async fn fetch_task(&self, query: &'static str, task_id: TaskId) -> Result<Option<Task>> {
        let row: Option<TaskRow> = run!(
            &self.db,
            sqlx::query_as(query).bind(task_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        row.map(Task::try_from).transpose()
    }

    /// Whether every counter of this report is already stored with the same value.
    async fn usage_already_reported(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        names: &[String],
        values: &[i64],
    ) -> Result<bool> {
        let matching: i64 = run!(
            &self.db,
            sqlx::query_scalar(sql::MATCHING_USAGE)
                .bind(task_id.as_uuid())
                .bind(token.as_uuid())
                .bind(names)
                .bind(values),
            fetch_one
        )
        .await
        .map_err(plain)?;
        Ok(usize::try_from(matching).is_ok_and(|matching| matching == names.len()))
    }
}

#[async_trait]
impl TaskStore for PgStore {
    async fn ping(&self) -> Result<()> {
        run!(&self.db, sqlx::query("SELECT 1"), execute)
            .await
            .map_err(plain)?;
        Ok(())
    }

    async fn create_api_key(&self, key: NewApiKey) -> Result<ApiKey> {
        credentials::create(&self.db, key).await
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        credentials::list(&self.db).await
    }

    async fn revoke_api_key(&self, key_id: Uuid) -> Result<ApiKey> {
        credentials::revoke(&self.db, key_id).await
    }

    async fn api_key_credential(&self, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>> {
        credentials::find(&self.liveness, key_id).await
    }

    async fn note_api_key_used(&self, key_id: Uuid) -> Result<()> {
        credentials::note_used(&self.liveness, key_id).await
    }

    async fn runtime_credential(&self, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>> {
        credentials::runtime(&self.liveness, runtime_id).await
    }

    async fn register_runtime(
        &self,
        runtime: NewRuntime,
        token_digest: SecretDigest,
    ) -> Result<Runtime> {
        let row: RuntimeRow = run!(
            &self.db,
            sqlx::query_as(sql::REGISTER_RUNTIME)
                .bind(RuntimeId::new_random().as_uuid())
                .bind(&runtime.name)
                .bind(&runtime.queues)
                .bind(Json(&runtime.labels))
                .bind(i64::from(runtime.max_concurrency))
                .bind(token_digest.as_bytes().as_slice())
                .bind(i32::try_from(REMEMBERED_REVOKED_TOKENS).unwrap_or(i32::MAX)),
            fetch_one
        )
        .await
        .map_err(plain)?;
        row.try_into()
    }

    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        let row: Option<(DateTime<Utc>, String)> = run!(
            &self.liveness,
            sqlx::query_as(sql::HEARTBEAT).bind(runtime_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let (server_time, status) = row.ok_or(Error::RuntimeNotFound(runtime_id))?;
        let status = RuntimeStatus::parse(&status)
            .ok_or_else(|| Error::Internal(format!("unexpected runtime status {status}").into()))?;
        Ok(HeartbeatAck {
            server_time,
            status,
        })
    }

    async fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
        let ids: Vec<Uuid> = runtimes.iter().map(|id| id.as_uuid()).collect();
        let touched: Vec<Uuid> = run!(
            &self.liveness,
            sqlx::query_scalar(sql::TOUCH_RUNTIMES).bind(ids),
            fetch_all
        )
        .await
        .map_err(plain)?;
        Ok(touched.into_iter().map(RuntimeId::from_uuid).collect())
    }

    async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
        let db = self.db.clone();
        detached(async move { deregister_in(&db, runtime_id).await }).await?
    }

    async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered> {
        self.require_runtime(runtime_id).await?;
        let query = sweep::fail_for_server_reason(
            &self.policy,
            sql::FAIL_ORPHANS,
            FailureReason::RuntimeRecovery,
            "the runtime restarted and declared the task lost",
            StageArgument::Runtime(Some(runtime_id.as_uuid())),
            i64::MAX,
        );
        let rows = run!(&self.db, query, fetch_all).await.map_err(plain)?;
        Ok(Recovered {
            moved: rows::moves(rows)?,
        })
    }

    async fn list_runtimes(
        &self,
        status: Option<RuntimeStatus>,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<Runtime>> {
        let rows: Vec<RuntimeRow> = run!(
            &self.db,
            sqlx::query_as(sql::LIST_RUNTIMES)
                .bind(status.map(RuntimeStatus::as_str))
                .bind(after)
                .bind(i64::from(limit)),
            fetch_all
        )
        .await
        .map_err(plain)?;
        rows.into_iter().map(Runtime::try_from).collect()
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome> {
        let rows: Vec<TaskRow> = run!(
            &self.db,
            sqlx::query_as(sql::CLAIM)
                .bind(request.runtime_id.as_uuid())
                .bind(i32::try_from(request.max_tasks).unwrap_or(i32::MAX))
                .bind(interval(self.policy.lease_duration))
                .bind(i64::from(self.policy.max_lease_expirations))
                .bind(request.budget.map(interval)),
            fetch_all
        )
        .await
        .map_err(|error| classify(error, Context::Runtime(request.runtime_id)))?;
        // The function returns the preflight's rows (QUEUED, or FAILED by the poison guard)
        // and then the claimed rows (DISPATCHED).
        let mut outcome = ClaimOutcome::default();
        for row in rows {
            let task = Task::try_from(row)?;
            if task.status == TaskStatus::Dispatched {
                outcome.claimed.push(claimed(task)?);
            } else {
                outcome.preflight.push(TaskMove::from(&task));
            }
        }
        Ok(outcome)
    }

    async fn expire_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<Vec<TaskMove>> {
        let (ids, tokens): (Vec<Uuid>, Vec<Uuid>) = claims
            .iter()
            .map(|(task_id, token)| (task_id.as_uuid(), token.as_uuid()))
            .unzip();
        let rows: Vec<MoveRow> = run!(
            &self.db,
            sqlx::query_as(sql::EXPIRE_CLAIMS)
                .bind(runtime_id.as_uuid())
                .bind(ids)
                .bind(tokens),
            fetch_all
        )
        .await
        .map_err(plain)?;
        rows::moves(rows)
    }

    async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        let row: Option<(i64, i64)> = run!(
            &self.db,
            sqlx::query_as(sql::RUNTIME_CAPACITY).bind(runtime_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let (max_concurrency, held) = row.ok_or(Error::RuntimeNotFound(runtime_id))?;
        Ok(Capacity {
            max_concurrency: to_u32("max_concurrency", max_concurrency)?,
            held: to_u32("held", held)?,
        })
    }

    async fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
        let row: Option<HorizonRow> = run!(
            &self.db,
            sqlx::query_as(sql::CLAIM_HORIZON).bind(runtime_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        row.map(ClaimHorizon::from)
            .ok_or(Error::RuntimeNotFound(runtime_id))
    }

    async fn sweep(
        &self,
        policy: &SweepPolicy,
        oracle: &dyn LivenessOracle,
        due_since: Option<DateTime<Utc>>,
    ) -> Result<Option<SweepReport>> {
        sweep::run(
            &self.sweeper,
            &self.leader,
            &self.policy,
            policy,
            oracle,
            due_since,
        )
        .await
    }

    async fn step_down(&self) -> Result<()> {
        run!(
            &self.sweeper,
            sqlx::query(sql::STEP_DOWN).bind(self.leader.holder),
            execute
        )
        .await
        .map_err(plain)?;
        Ok(())
    }

    async fn start(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        self.fenced(GuardedWrite::Start, task_id, token, acting)
            .await?
            .into_task()
    }

    async fn extend_lease(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        extend_by: Duration,
        acting: Option<RuntimeId>,
    ) -> Result<LeaseRenewal> {
        match self
            .fenced(GuardedWrite::ExtendLease(extend_by), task_id, token, acting)
            .await?
        {
            Fenced::Applied(Applied::Lease(renewal)) => Ok(renewal),
            _ => Err(Error::Internal(
                "ExtendLease answered with something other than a lease expiry".into(),
            )),
        }
    }

    async fn complete(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        result: Vec<u8>,
        acting: Option<RuntimeId>,
    ) -> Result<Task> {
        self.fenced(GuardedWrite::Complete(&result), task_id, token, acting)
            .await?
            .into_task()
    }

    async fn fail(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        failure: Failure,
        acting: Option<RuntimeId>,
    ) -> Result<FailOutcome> {
        Ok(
            match self
                .fenced(GuardedWrite::Fail(&failure), task_id, token, acting)
                .await?
            {
                Fenced::Replayed(task) => FailOutcome {
                    will_retry: fence::replayed_fail_retried(&task, token),
                    task: *task,
                },
                applied => {
                    let task = applied.into_task()?;
                    FailOutcome {
                        will_retry: task.status == TaskStatus::Queued,
                        task,
                    }
                }
            },
        )
    }

    async fn report_usage(
        &self,
        task_id: TaskId,
        token: ClaimToken,
        counters: BTreeMap<String, i64>,
        acting: Option<RuntimeId>,
    ) -> Result<Option<RuntimeId>> {
        let (names, values): (Vec<String>, Vec<i64>) = counters.into_iter().unzip();
        let holder = acting.map(|runtime| runtime.as_uuid());
        for _ in 0..FENCED_WRITE_ATTEMPTS {
            let (applied, holder, _written): (bool, Option<Uuid>, i64) = run!(
                &self.db,
                sqlx::query_as(sql::REPORT_USAGE)
                    .bind(task_id.as_uuid())
                    .bind(token.as_uuid())
                    .bind(&names)
                    .bind(&values)
                    .bind(holder),
                fetch_one
            )
            .await
            .map_err(plain)?;
            if applied {
                return Ok(holder.map(RuntimeId::from_uuid));
            }
            let (task, now) = self.fence_snapshot(task_id).await?;
            if !names.is_empty()
                && self
                    .usage_already_reported(task_id, token, &names, &values)
                    .await?
            {
                return Ok(task.claimed_by);
            }
            if fence::held_by_another(&task, acting) {
                return Err(Error::RuntimeMismatch);
            }
            match fence::judge(OwnerWrite::ReportUsage, &task, token, now) {
                Verdict::Apply => continue,
                Verdict::Replay => return Ok(task.claimed_by),
                Verdict::Refuse(refusal) => return Err(Error::refused(refusal, &task)),
            }
        }
        Err(Error::Internal(
            "a usage report kept racing with concurrent changes".into(),
        ))
    }

    async fn task_status(
        &self,
        task_id: TaskId,
        acting: Option<RuntimeId>,
    ) -> Result<(TaskStatus, u32)> {
        type StatusRow = (String, i64, Option<Uuid>, Option<Uuid>);
        let row: Option<StatusRow> = run!(
            &self.db,
            sqlx::query_as(sql::TASK_STATUS).bind(task_id.as_uuid()),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let (status, attempt, claimed_by, pinned_to) = row.ok_or(Error::TaskNotFound(task_id))?;
        let runtime = |id: Option<Uuid>| id.map(RuntimeId::from_uuid);
        if !fence::visible_to(runtime(claimed_by), runtime(pinned_to), acting) {
            return Err(Error::RuntimeMismatch);
        }
        let status = TaskStatus::parse(&status)
            .ok_or_else(|| Error::Internal(format!("unexpected task status {status}").into()))?;
        Ok((status, to_u32("attempt", attempt)?))
    }

    async fn enqueue(&self, task: NewTask) -> Result<Enqueued> {
        let context = task.pinned_to.map_or(Context::Plain, Context::Runtime);
        let execution_timeout_ms = task
            .execution_timeout
            .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
        let inserted: Option<TaskRow> = run!(
            &self.db,
            sqlx::query_as(sql::ENQUEUE)
                .bind(TaskId::new_random().as_uuid())
                .bind(&task.queue)
                .bind(task.pinned_to.map(|id| id.as_uuid()))
                .bind(&task.concurrency_key)
                .bind(task.priority)
                .bind(&task.payload)
                .bind(Json(&task.metadata))
                .bind(i64::from(task.max_attempts))
                .bind(&task.idempotency_key)
                .bind(execution_timeout_ms)
                .bind(interval(task.delay)),
            fetch_optional
        )
        .await
        .map_err(|error| classify(error, context))?;
        if let Some(row) = inserted {
            return Ok(Enqueued {
                task: row.try_into()?,
                deduplicated: false,
            });
        }
        // ON CONFLICT DO NOTHING: the idempotency key is taken, and its owner has committed.
        let existing: Option<TaskRow> = run!(
            &self.db,
            sqlx::query_as(sql::BY_IDEMPOTENCY_KEY)
                .bind(&task.queue)
                .bind(&task.idempotency_key),
            fetch_optional
        )
        .await
        .map_err(plain)?;
        let existing = existing.ok_or_else(|| {
            Error::Internal("idempotency conflict without a matching task".into())
        })?;
        Ok(Enqueued {
            task: existing.try_into()?,
            deduplicated: true,
        })
    }

    async fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>> {
        let ids: Vec<TaskId> = tasks.iter().map(|_| TaskId::new_random()).collect();
        let db = self.db.clone();
        let (tasks, ids, stored) = detached(async move {
            let stored = insert_batch(&db, &tasks, &ids).await;
            (tasks, ids, stored)
        })
        .await?;
        let (known, inserted) = stored?;
        let insertable = |task: &NewTask| {
            task.pinned_to
                .is_none_or(|pin| known.contains(&pin.as_uuid()))
        };
        let mut inserted: HashMap<TaskId, Task> = inserted
            .into_iter()
            .map(|row| Task::try_from(row).map(|task| (task.id, task)))
            .collect::<Result<_>>()?;
        // Tasks an item deduplicates to: stored earlier, or by an earlier item of this batch.
        let mut existing = self.existing_by_idempotency_key(&tasks, &inserted).await?;
        for task in inserted.values() {
            if let Some(key) = &task.idempotency_key {
                existing.insert((task.queue.clone(), key.clone()), task.clone());
            }
        }
        Ok(tasks
            .iter()
            .zip(ids)
            .map(|(task, id)| {
                if let Some(task) = inserted.remove(&id) {
                    return Ok(Enqueued {
                        task,
                        deduplicated: false,
                    });
                }
                let key = task
                    .idempotency_key
                    .clone()
                    .map(|key| (task.queue.clone(), key));
                match (key.and_then(|key| existing.get(&key)), task.pinned_to) {
                    (Some(found), _) => Ok(Enqueued {
                        task: found.clone(),
                        deduplicated: true,
                    }),
                    (None, Some(pin)) if !insertable(task) => Err(Error::RuntimeNotFound(pin)),
                    (None, _) => Err(Error::Internal(
                        "a batch item was neither stored nor deduplicated".into(),
                    )),
                }
            })
            .collect())
    }

    async fn get_task(&self, task_id: TaskId) -> Result<Task> {
        self.fetch_task(sql::GET_TASK, task_id)
            .await?
            .ok_or(Error::TaskNotFound(task_id))
    }

    async fn list_tasks(
        &self,
        filter: TaskFilter,
        after: Option<PageCursor>,
        page_size: u32,
    ) -> Result<TaskPage> {
        let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        // One extra row tells whether another page follows.
        let rows: Vec<TaskRow> = run!(
            &self.db,
            sqlx::query_as(sql::LIST_TASKS)
                .bind(&filter.queue)
                .bind(&statuses)
                .bind(filter.runtime_id.map(|id| id.as_uuid()))
                .bind(after.map(|cursor| cursor.created_at))
                .bind(after.map(|cursor| cursor.id.as_uuid()))
                .bind(i64::from(page_size) + 1),
            fetch_all
        )
        .await
        .map_err(plain)?;
        let mut tasks = rows
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>>>()?;
        let next = if tasks.len() > page_size as usize {
            tasks.truncate(page_size as usize);
            tasks.last().map(|last| PageCursor {
                created_at: last.created_at,
                id: last.id,
            })
        } else {
            None
        };
        Ok(TaskPage { tasks, next })
    }

    async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        for _ in 0..FENCED_WRITE_ATTEMPTS {
            if let Some(task) = self.fetch_task(sql::CANCEL, task_id).await? {
                return Ok(task);
            }
            let task = self.get_task(task_id).await?;
            if task.status.is_terminal() {
                return Ok(task);
            }
        }
        Err(Error::Internal(
            "cancel kept racing with concurrent changes".into(),
        ))
    }

    async fn queue_depths(&self) -> Result<Vec<QueueDepth>> {
        // Only the sweeper asks, after its sweep: on its connections.
        let rows: Vec<(String, i64, i64, i64, Option<f64>)> =
            run!(&self.sweeper, sqlx::query_as(sql::QUEUE_DEPTHS), fetch_all)
                .await
                .map_err(plain)?;
        rows.into_iter()
            .map(|(queue, queued, dispatched, running, oldest)| {
                Ok(QueueDepth {
                    queue,
                    queued: to_u64("count", queued)?,
                    dispatched: to_u64("count", dispatched)?,
                    running: to_u64("count", running)?,
                    oldest_queued_age: oldest
                        .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok()),
                })
            })
            .collect()
    }

    async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        if let Some(task) = self.fetch_task(sql::RETRY_TASK, task_id).await? {
            return Ok(task);
        }
        let task = self.get_task(task_id).await?;
        Err(Error::NotRetryable {
            task_id,
            status: task.status,
        })
    }

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        let row: QueueRow = run!(
            &self.db,
            sqlx::query_as(sql::DESCRIBE_QUEUE).bind(queue),
            fetch_one
        )
        .await
        .map_err(plain)?;
        Ok(QueueInfo {
            name: queue.to_owned(),
            max_concurrent: to_u32("max_concurrent", row.max_concurrent)?,
            paused: row.paused,
            default_execution_timeout: row
                .default_execution_timeout_ms
                .map(|ms| Duration::from_millis(ms.unsigned_abs())),
            counts: StatusCounts {
                queued: to_u64("count", row.queued)?,
                dispatched: to_u64("count", row.dispatched)?,
                running: to_u64("count", row.running)?,
                completed: to_u64("count", row.completed)?,
                failed: to_u64("count", row.failed)?,
                cancelled: to_u64("count", row.cancelled)?,
            },
            oldest_queued_at: row.oldest_queued_at,
        })
    }

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        run!(
            &self.db,
            sqlx::query(sql::UPDATE_QUEUE)
                .bind(queue)
                .bind(update.max_concurrent.map(i64::from))
                .bind(update.paused)
                .bind(update.default_execution_timeout.is_some())
                .bind(
                    update
                        .default_execution_timeout
                        .flatten()
                        .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)),
                ),
            execute
        )
        .await
        .map_err(plain)?;
        self.describe_queue(queue).await
    }
}

/// Runs `work` in a task of its own, to its end even when the caller is dropped (a client that
/// went away cancels its handler). sqlx's `Pool::begin` is not cancel-safe on PostgreSQL
/// (sqlx#4393, unreleased fix): a BEGIN cancelled in flight leaves the pooled connection inside
/// a transaction, and the next borrower's writes run in it, acknowledged but uncommitted (the
/// soak caught a StartTask acknowledged, then invisible to the CompleteTask that followed).
/// Every explicit transaction on the request pool goes through here.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|error| Error::Internal(error.into()))
}

/// DeregisterRuntime's transaction: the runtime OFFLINE, its unstarted claims requeued (T4'').
async fn deregister_in(db: &Db, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
    let mut tx = db.begin().await.map_err(plain)?;
    let found: Option<Uuid> = sqlx::query_scalar(sql::DEREGISTER_RUNTIME)
        .persistent(db.prepares())
        .bind(runtime_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(plain)?;
    if found.is_none() {
        return Err(Error::RuntimeNotFound(runtime_id));
    }
    let rows: Vec<MoveRow> = sqlx::query_as(sql::REQUEUE_UNSTARTED)
        .persistent(db.prepares())
        .bind(runtime_id.as_uuid())
        .fetch_all(&mut *tx)
        .await
        .map_err(plain)?;
    tx.commit().await.map_err(plain)?;
    rows::moves(rows)
}

/// EnqueueTasks' transaction: which pinned runtimes exist, then every insertable item in one
/// statement. Returns the known runtimes and the stored rows.
async fn insert_batch(
    db: &Db,
    tasks: &[NewTask],
    ids: &[TaskId],
) -> Result<(Vec<Uuid>, Vec<TaskRow>)> {
    let mut tx = db.begin().await.map_err(plain)?;
    let pins: Vec<Uuid> = tasks
        .iter()
        .filter_map(|task| task.pinned_to.map(|pin| pin.as_uuid()))
        .collect();
    let known: Vec<Uuid> = sqlx::query_scalar(sql::KNOWN_RUNTIMES)
        .persistent(db.prepares())
        .bind(&pins)
        .fetch_all(&mut *tx)
        .await
        .map_err(plain)?;
    let insertable = |task: &NewTask| {
        task.pinned_to
            .is_none_or(|pin| known.contains(&pin.as_uuid()))
    };
    let batch = BatchColumns::of(tasks.iter().zip(ids).filter(|(task, _)| insertable(task)));
    let inserted: Vec<TaskRow> = batch
        .bind(sqlx::query_as(sql::ENQUEUE_BATCH).persistent(db.prepares()))
        .fetch_all(&mut *tx)
        .await
        .map_err(plain)?;
    tx.commit().await.map_err(plain)?;
    Ok((known, inserted))
}

/// ENQUEUE_BATCH's parameters: one array per column.
#[derive(Default)]
struct BatchColumns {
    ids: Vec<Uuid>,
    queues: Vec<String>,
    pins: Vec<Option<Uuid>>,
    concurrency_keys: Vec<Option<String>>,
    priorities: Vec<i32>,
    payloads: Vec<Vec<u8>>,
    metadata: Vec<Json<BTreeMap<String, String>>>,
    max_attempts: Vec<i64>,
    idempotency_keys: Vec<Option<String>>,
    execution_timeouts_ms: Vec<Option<i64>>,
    delays_ms: Vec<f64>,
}

impl BatchColumns {
    fn of<'a>(tasks: impl Iterator<Item = (&'a NewTask, &'a TaskId)>) -> Self {
        let mut columns = BatchColumns::default();
        for (task, id) in tasks {
            columns.ids.push(id.as_uuid());
            columns.queues.push(task.queue.clone());
            columns.pins.push(task.pinned_to.map(|pin| pin.as_uuid()));
            columns.concurrency_keys.push(task.concurrency_key.clone());
            columns.priorities.push(task.priority);
            columns.payloads.push(task.payload.clone());
            columns.metadata.push(Json(task.metadata.clone()));
            columns.max_attempts.push(i64::from(task.max_attempts));
            columns.idempotency_keys.push(task.idempotency_key.clone());
            columns.execution_timeouts_ms.push(
                task.execution_timeout
                    .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)),
            );
            columns
                .delays_ms
                .push(interval(task.delay).as_secs_f64() * 1000.0);
        }
        columns
    }

    fn bind<'q>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, TaskRow, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, TaskRow, sqlx::postgres::PgArguments> {
        query
            .bind(self.ids)
            .bind(self.queues)
            .bind(self.pins)
            .bind(self.concurrency_keys)
            .bind(self.priorities)
            .bind(self.payloads)
            .bind(self.metadata)
            .bind(self.max_attempts)
            .bind(self.idempotency_keys)
            .bind(self.execution_timeouts_ms)
            .bind(self.delays_ms)
    }
}

impl Fenced {
    fn into_task(self) -> Result<Task> {
        match self {
            Fenced::Applied(Applied::Task(task)) | Fenced::Replayed(task) => Ok(*task),
            Fenced::Applied(Applied::Lease(_)) => Err(Error::Internal(
                "a task write answered with a lease expiry".into(),
            )),
        }
    }
}

/// A guarded statement's answer: the task when it applied.
fn applied_task(row: sqlx::Result<Option<TaskRow>>) -> Result<Option<Applied>> {
    row.map_err(plain)?
        .map(|row| Task::try_from(row).map(|task| Applied::Task(Box::new(task))))
        .transpose()
}

fn claimed(task: Task) -> Result<ClaimedTask> {
    match (task.claim_token, task.lease_expires_at) {
        (Some(claim_token), Some(lease_expires_at)) => Ok(ClaimedTask {
            claim_token,
            lease_expires_at,
            task,
        }),
        _ => Err(Error::Internal(
            "a claimed row came back without its token or lease".into(),
        )),
    }
}
