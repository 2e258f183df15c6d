//! Differential property test: random operation sequences run against the memory store and
//! the PostgreSQL store through the `TaskStore` trait; every call must have the same outcome
//! (error kind, task status, attempt, claimed tasks) and the final tasks must agree.
//!
//! `PROPTEST_CASES` sets the case count (CI runs the default, 48). For a long local run:
//! `PROPTEST_CASES=5000 cargo nextest run differential`.
//!
//! Time passes the same way in both: the memory store's test clock moves forward, PostgreSQL's
//! stored timestamps move back. Advances are 11s, 29s, 61s and 400s, which never add up to the
//! 60s lease exactly, so no case sits on a boundary where microseconds of real time decide.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use leasehold::app::store_policy;
use leasehold::domain::{ClaimToken, Error, Task, TaskId};
use leasehold::store::memory::MemoryStore;
use leasehold::store::postgres::PgStore;
use leasehold::store::{ClaimRequest, Failure, NewRuntime, NewTask, QueueUpdate, TaskStore};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

const RUNTIMES: usize = 3;
const QUEUES: usize = 2;
/// Which queues each runtime serves.
const SERVES: [&[usize]; RUNTIMES] = [&[0, 1], &[0], &[1]];
const ADVANCES: [u64; 4] = [11, 29, 61, 400];

mod ops;

use ops::{Op, TokenPick, op};

/// One store under test, with what the sequence has learned from it so far.
struct Subject<'a> {
    store: &'a dyn TaskStore,
    runtimes: Vec<leasehold::domain::RuntimeId>,
    tasks: Vec<TaskId>,
    /// Every token each task was claimed with, oldest first.
    tokens: HashMap<TaskId, Vec<ClaimToken>>,
}

impl Subject<'_> {
    fn token(&self, task: TaskId, pick: TokenPick) -> ClaimToken {
        let history = self
            .tokens
            .get(&task)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let chosen = match pick {
            TokenPick::Current => history.last(),
            TokenPick::Stale => history
                .len()
                .checked_sub(2)
                .and_then(|index| history.get(index)),
            TokenPick::Unknown => None,
        };
        // A fixed never-issued token keeps both stores on the same input.
        chosen
            .copied()
            .unwrap_or_else(|| ClaimToken::from_uuid(uuid::Uuid::nil()))
    }

    /// A store-independent description of a task: indexes instead of ids, no timestamps.
    fn describe(&self, task: &Task) -> String {
        let index = |id: TaskId| self.tasks.iter().position(|known| *known == id);
        let runtime = |id| self.runtimes.iter().position(|known| *known == id);
        format!(
            "task#{:?} {:?} attempt {} expirations {} claimed_by {:?} reason {:?} error {:?} result {:?}",
            index(task.id),
            task.status,
            task.attempt,
            task.lease_expirations,
            task.claimed_by.and_then(runtime),
            task.failure_reason,
            task.error,
            task.result
        )
    }
}

fn describe_error(error: &Error) -> String {
    match error {
        Error::Refused(refused) => {
            format!("refused {:?} while {:?}", refused.refusal, refused.status)
        }
        Error::TaskNotFound(_) => "task not found".into(),
        Error::RuntimeNotFound(_) => "runtime not found".into(),
        other => format!("{other}"),
    }
}

async fn apply(
    subject: &mut Subject<'_>,
    op: &Op,
    names: &Names,
    advance: &dyn Fn(u64) -> futures::future::BoxFuture<'static, ()>,
) -> String {
    let store = subject.store;
    let task_at = |index: usize| subject.tasks.get(index).copied();
    let outcome: Result<String, Error> = match op {
        Op::Enqueue {
            queue,
            priority,
            pin,
            key,
            delayed,
            max_attempts,
            idempotency,
        } => store
            .enqueue(NewTask {
                queue: names.queue(*queue),
                payload: vec![1, 2, 3],
                metadata: BTreeMap::new(),
                priority: *priority,
                pinned_to: pin.map(|runtime| subject.runtimes[runtime]),
                concurrency_key: key.map(|key| format!("key-{key}")),
                idempotency_key: idempotency.map(|key| format!("idem-{key}")),
                max_attempts: *max_attempts,
                delay: if *delayed {
                    Duration::from_secs(5)
                } else {
                    Duration::ZERO
                },
                execution_timeout: None,
            })
            .await
            .map(|enqueued| {
                if !enqueued.deduplicated {
                    subject.tasks.push(enqueued.task.id);
                }
                format!(
                    "enqueued deduplicated={} {}",
                    enqueued.deduplicated,
                    subject.describe(&enqueued.task)
                )
            }),
        Op::Claim {
            runtime,
            max_tasks,
            auto_start,
        } => store
            .claim(ClaimRequest {
                runtime_id: subject.runtimes[*runtime],
                max_tasks: *max_tasks,
                budget: None,
                auto_start: *auto_start,
            })
            .await
            .map(|outcome| {
                let mut preflight: Vec<String> = outcome
                    .preflight
                    .iter()
                    .map(|moved| {
                        let index = subject.tasks.iter().position(|id| *id == moved.task_id);
                        format!("task#{index:?} {:?}", moved.status)
                    })
                    .collect();
                preflight.sort();
                let mut described = Vec::new();
                for claim in outcome.claimed {
                    subject
                        .tokens
                        .entry(claim.task.id)
                        .or_default()
                        .push(claim.claim_token);
                    described.push(subject.describe(&claim.task));
                }
                format!("preflight {preflight:?} claimed {described:?}")
            }),
        Op::Start { task, token }
        | Op::Extend { task, token }
        | Op::Complete { task, token }
        | Op::Fail { task, token, .. } => {
            let Some(task_id) = task_at(*task) else {
                return "no such task".into();
            };
            let token = subject.token(task_id, *token);
            match op {
                Op::Start { .. } => store
                    .start(task_id, token, None)
                    .await
                    .map(|task| subject.describe(&task)),
                Op::Extend { .. } => store
                    .extend_lease(task_id, token, Duration::from_secs(60), None)
                    .await
                    .map(|_| "extended".into()),
                Op::Complete { .. } => store
                    .complete(task_id, token, b"done".to_vec(), None)
                    .await
                    .map(|task| subject.describe(&task)),
                Op::Fail { retryable, .. } => store
                    .fail(
                        task_id,
                        token,
                        Failure {
                            error: "boom".into(),
                            retryable: *retryable,
                            jitter: 0.5,
                        },
                        None,
                    )
                    .await
                    .map(|outcome| {
                        format!(
                            "will_retry={} {}",
                            outcome.will_retry,
                            subject.describe(&outcome.task)
                        )
                    }),
                _ => unreachable!(),
            }
        }
        Op::Usage { task, token, value } => {
            let Some(task_id) = task_at(*task) else {
                return "no such task".into();
            };
            let token = subject.token(task_id, *token);
            let counters = BTreeMap::from([("units".to_string(), *value)]);
            store
                .report_usage(task_id, token, counters, None)
                .await
                .map(|_| "usage recorded".into())
        }
        Op::Cancel { task } => {
            let Some(task_id) = task_at(*task) else {
                return "no such task".into();
            };
            store
                .cancel(task_id)
                .await
                .map(|task| subject.describe(&task))
        }
        Op::Cap {
            queue,
            max_concurrent,
        } => store
            .update_queue(
                &names.queue(*queue),
                QueueUpdate {
                    max_concurrent: Some(*max_concurrent),
                    ..QueueUpdate::default()
                },
            )
            .await
            .map(|info| format!("cap {}", info.max_concurrent)),
        Op::Pause { queue, paused } => store
            .update_queue(
                &names.queue(*queue),
                QueueUpdate {
                    paused: Some(*paused),
                    ..QueueUpdate::default()
                },
            )
            .await
            .map(|info| format!("paused {}", info.paused)),
        Op::Advance { seconds } => {
            advance(*seconds).await;
            Ok("time passed".into())
        }
    };
    outcome.unwrap_or_else(|error| format!("error: {}", describe_error(&error)))
}

/// Queue and runtime names unique to one case, so cases share a database without meeting.
struct Names {
    case: usize,
}

impl Names {
    fn queue(&self, index: usize) -> String {
        format!("c{}-q{index}", self.case)
    }
}

async fn register(store: &dyn TaskStore, names: &Names) -> Vec<leasehold::domain::RuntimeId> {
    let mut ids = Vec::new();
    for (index, queues) in SERVES.iter().enumerate() {
        let runtime = store
            .register_runtime(
                NewRuntime {
                    name: format!("c{}-r{index}", names.case),
                    queues: queues.iter().map(|queue| names.queue(*queue)).collect(),
                    labels: BTreeMap::new(),
                    max_concurrency: 3,
                },
                leasehold::domain::auth::Secret::random().digest(),
            )
            .await
            .unwrap();
        ids.push(runtime.id);
    }
    ids
}

/// Lets time pass for one case's tasks only (its queues carry the case's prefix), so a long run
/// does not rewrite every earlier case's rows too.
async fn shift_postgres_clock(pool: PgPool, case: usize, seconds: u64) {
    let shift = sqlx::postgres::types::PgInterval::try_from(Duration::from_secs(seconds)).unwrap();
    sqlx::query(
        "UPDATE tasks SET created_at = created_at - $1, available_at = available_at - $1,
             dispatched_at = dispatched_at - $1, started_at = started_at - $1,
             finished_at = finished_at - $1, lease_expires_at = lease_expires_at - $1
         WHERE queue LIKE $2",
    )
    .bind(shift)
    .bind(format!("c{case}-%"))
    .execute(&pool)
    .await
    .unwrap();
}

async fn run_case(pool: &PgPool, case: usize, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut config = crate::harness::test_config();
    // Low enough that random sequences reach the poison guard.
    config.max_lease_expirations = 1;
    let memory_store = MemoryStore::new(store_policy(&config));
    let postgres_store = PgStore::new(pool.clone(), store_policy(&config));
    let names = Names { case };
    let mut memory = Subject {
        store: &memory_store,
        runtimes: register(&memory_store, &names).await,
        tasks: Vec::new(),
        tokens: HashMap::new(),
    };
    let mut postgres = Subject {
        store: &postgres_store,
        runtimes: register(&postgres_store, &names).await,
        tasks: Vec::new(),
        tokens: HashMap::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let memory_outcome = apply(&mut memory, op, &names, &|seconds| {
            memory_store.advance_clock(Duration::from_secs(seconds));
            Box::pin(async {})
        })
        .await;
        let pool = pool.clone();
        let postgres_outcome = apply(&mut postgres, op, &names, &move |seconds| {
            Box::pin(shift_postgres_clock(pool.clone(), case, seconds))
        })
        .await;
        prop_assert_eq!(
            &memory_outcome,
            &postgres_outcome,
            "step {} ({:?}): memory vs postgres",
            step,
            op
        );
    }
    for index in 0..memory.tasks.len() {
        let in_memory = memory_store.get_task(memory.tasks[index]).await.unwrap();
        let in_postgres = postgres_store
            .get_task(postgres.tasks[index])
            .await
            .unwrap();
        prop_assert_eq!(
            memory.describe(&in_memory),
            postgres.describe(&in_postgres),
            "final task #{}",
            index
        );
    }
    for queue in 0..QUEUES {
        let in_memory = memory_store
            .describe_queue(&names.queue(queue))
            .await
            .unwrap();
        let in_postgres = postgres_store
            .describe_queue(&names.queue(queue))
            .await
            .unwrap();
        prop_assert_eq!(
            (in_memory.counts, in_memory.max_concurrent, in_memory.paused),
            (
                in_postgres.counts,
                in_postgres.max_concurrent,
                in_postgres.paused
            ),
            "final queue #{}",
            queue
        );
    }
    Ok(())
}

#[test]
fn memory_and_postgres_stores_agree_on_random_operation_sequences() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let admin_url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let database = format!("leasehold_differential_{}", std::process::id());
    let pool = runtime.block_on(async {
        let mut admin = PgConnection::connect(&admin_url).await.unwrap();
        // The name is a fixed prefix and our pid: nothing external reaches this SQL.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {database}")))
            .execute(&mut admin)
            .await
            .unwrap();
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(base, _)| base);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!("{base}/{database}"))
            .await
            .unwrap();
        leasehold::store::postgres::schema::migrator()
            .run(&pool)
            .await
            .unwrap();
        // Moving timestamps back would carry finished tasks behind the finished-task tally's
        // watermark without being counted; with the watermark at the beginning of time (no
        // sweep runs here) DescribeQueue counts every finished task itself.
        sqlx::query("UPDATE finished_tally_progress SET counted_through = '-infinity'")
            .execute(&pool)
            .await
            .unwrap();
        pool
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&prop::collection::vec(op(), 1..40), |ops| {
        let case = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        runtime.block_on(run_case(&pool, case, &ops))
    });
    runtime.block_on(async {
        pool.close().await;
        let mut admin = PgConnection::connect(&admin_url).await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE {database} WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await
        .unwrap();
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
