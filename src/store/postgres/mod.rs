//! The PostgreSQL store. Each operation is one statement on its happy path; a fenced write
//! that matched no row costs one more read to say why (or to answer a replay).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::domain::auth::{ApiKey, SecretDigest};
use crate::domain::fence::{self};
use crate::domain::{
    ClaimToken, Error, FailureReason, QueueInfo, Result, Runtime, RuntimeId, RuntimeStatus, Task,
    TaskId, TaskStatus,
};
use crate::store::{
    AttemptFailure, Capacity, ClaimHorizon, ClaimOutcome, ClaimRequest, Enqueued, FailOutcome,
    Failure, HeartbeatAck, LeaseRenewal, LivenessOracle, MinuteCount, NewApiKey, NewRuntime,
    NewTask, PageCursor, QueueDepth, QueueOverview, QueueUpdate, Recovered, RuntimeCredential,
    StorePolicy, SweepPolicy, SweepReport, TaskFilter, TaskMove, TaskPage, TaskStore,
};
use crate::telemetry::metrics::Metrics;

mod claim;
mod coalesce;
mod credentials;
mod enqueue;
mod errors;
mod fenced;
pub mod pooler;
mod queues;
mod rows;
mod runtimes;
pub mod schema;
mod shared_claims;
mod sql;
mod sweep;

use coalesce::Coalescer;
use errors::plain;
use fenced::{Applied, FENCED_WRITE_ATTEMPTS, Fenced, GuardedWrite};
use pooler::{Db, Route, run};
use rows::{TaskRow, to_u32};
use sweep::StageArgument;

/// Statements tests examine with EXPLAIN, and the bench ceiling runs through pgbench.
#[doc(hidden)]
pub mod statements {
    pub const DESCRIBE_QUEUE: &str = super::sql::DESCRIBE_QUEUE;
    pub const QUEUE_DEPTHS: &str = super::sql::QUEUE_DEPTHS;
    pub const CLAIM_MANY: &str = super::sql::CLAIM_MANY;
    pub const START_MANY: &str = super::sql::START_MANY;
    pub const COMPLETE_MANY: &str = super::sql::COMPLETE_MANY;
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
    claims: shared_claims::SharedClaims,
    /// The server's metrics, once a coordinator took the store ([`TaskStore::attach_metrics`]).
    metrics: Arc<OnceLock<Metrics>>,
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
        let metrics = Arc::<OnceLock<Metrics>>::default();
        // The replica's write turn: one claim, start or complete statement at a time.
        let turn = Arc::new(tokio::sync::Semaphore::new(1));
        Self {
            starts: Coalescer::new(db.clone(), turn.clone(), metrics.clone()),
            completes: Coalescer::new(db.clone(), turn.clone(), metrics.clone()),
            claims: shared_claims::SharedClaims::new(db.clone(), &policy, turn, metrics.clone()),
            metrics,
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
}

#[async_trait]
impl TaskStore for PgStore {
    fn attach_metrics(&self, metrics: &Metrics) {
        // A store taken by a second coordinator keeps counting for the first.
        let _ = self.metrics.set(metrics.clone());
    }

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
        runtimes::register(&self.db, runtime, token_digest).await
    }

    async fn heartbeat(&self, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
        runtimes::heartbeat(&self.liveness, runtime_id).await
    }

    async fn touch_runtimes(&self, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
        runtimes::touch(&self.liveness, runtimes).await
    }

    async fn deregister_runtime(&self, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
        let db = self.db.clone();
        detached(async move { runtimes::deregister(&db, runtime_id).await }).await?
    }

    async fn recover_orphans(&self, runtime_id: RuntimeId) -> Result<Recovered> {
        runtimes::require(&self.db, runtime_id).await?;
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
        runtimes::list(&self.db, status, after, limit).await
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome> {
        let deadline = request
            .budget
            .map(|budget| tokio::time::Instant::now() + budget);
        match self.claims.claim(request, deadline).await {
            Some(rows) => claim::outcome(rows),
            None => {
                // Alone, with what is left of the caller's budget.
                let budget = shared_claims::remaining(deadline, tokio::time::Instant::now());
                let request = ClaimRequest { budget, ..request };
                claim::claim(&self.db, &self.policy, request).await
            }
        }
    }

    async fn expire_claims(
        &self,
        runtime_id: RuntimeId,
        claims: &[(TaskId, ClaimToken)],
    ) -> Result<Vec<TaskMove>> {
        claim::expire(&self.db, runtime_id, claims).await
    }

    async fn runtime_capacity(&self, runtime_id: RuntimeId) -> Result<Capacity> {
        runtimes::capacity(&self.db, runtime_id).await
    }

    async fn claim_horizon(&self, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
        runtimes::horizon(&self.db, runtime_id).await
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
        self.report_usage_fenced(task_id, token, counters, acting)
            .await
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
        enqueue::one(&self.db, task).await
    }

    async fn enqueue_batch(&self, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>> {
        enqueue::batch(&self.db, tasks).await
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
        queues::list_tasks(&self.db, filter, after, page_size).await
    }

    async fn cancel(&self, task_id: TaskId) -> Result<Task> {
        for _ in 0..FENCED_WRITE_ATTEMPTS {
            let cancelled = queues::change_many(&self.db, sql::CANCEL_MANY, &[task_id]).await?;
            if let Some(task) = cancelled.into_iter().next() {
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
        queues::depths(&self.sweeper).await
    }

    async fn task_failures(&self, task_id: TaskId) -> Result<Vec<AttemptFailure>> {
        queues::task_failures(&self.db, task_id).await
    }

    async fn task_usage(&self, task_id: TaskId) -> Result<BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = run!(
            &self.db,
            sqlx::query_as(sql::TASK_USAGE).bind(task_id.as_uuid()),
            fetch_all
        )
        .await
        .map_err(plain)?;
        Ok(rows.into_iter().collect())
    }

    async fn queue_overview(&self, limit: u32) -> Result<QueueOverview> {
        queues::overview(&self.db, limit).await
    }

    async fn throughput(&self, since: DateTime<Utc>) -> Result<Vec<MinuteCount>> {
        queues::throughput(&self.db, since).await
    }

    async fn retry_task(&self, task_id: TaskId) -> Result<Task> {
        let redriven = queues::change_many(&self.db, sql::RETRY_MANY, &[task_id]).await?;
        if let Some(task) = redriven.into_iter().next() {
            return Ok(task);
        }
        let task = self.get_task(task_id).await?;
        Err(Error::NotRetryable {
            task_id,
            status: task.status,
        })
    }

    async fn matching_task_ids(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<Vec<TaskId>> {
        queues::matching_task_ids(&self.db, filter, after, limit).await
    }

    async fn cancel_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>> {
        queues::change_many(&self.db, sql::CANCEL_MANY, task_ids).await
    }

    async fn retry_many(&self, task_ids: &[TaskId]) -> Result<Vec<Task>> {
        queues::change_many(&self.db, sql::RETRY_MANY, task_ids).await
    }

    async fn describe_queue(&self, queue: &str) -> Result<QueueInfo> {
        queues::describe(&self.db, queue).await
    }

    async fn update_queue(&self, queue: &str, update: QueueUpdate) -> Result<QueueInfo> {
        queues::update(&self.db, queue, update).await
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
