//! EnqueueTask and EnqueueTasks: one insert (ON CONFLICT on the idempotency key), or one
//! transaction for a batch, then the tasks that already held the keys of what was not stored.

use std::collections::{BTreeMap, HashMap, HashSet};

use sqlx::types::Json;
use uuid::Uuid;

use super::errors::{Context, classify, plain};
use super::pooler::{Db, run};
use super::rows::TaskRow;
use super::{detached, interval, sql};
use crate::domain::{Error, Result, Task, TaskId};
use crate::store::{Enqueued, NewTask};

/// EnqueueTask.
pub(super) async fn one(db: &Db, task: NewTask) -> Result<Enqueued> {
    let context = task.pinned_to.map_or(Context::Plain, Context::Runtime);
    let execution_timeout_ms = task
        .execution_timeout
        .map(|timeout| i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
    let inserted: Option<TaskRow> = run!(
        db,
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
        db,
        sqlx::query_as(sql::BY_IDEMPOTENCY_KEY)
            .bind(&task.queue)
            .bind(&task.idempotency_key),
        fetch_optional
    )
    .await
    .map_err(plain)?;
    let existing = existing
        .ok_or_else(|| Error::Internal("idempotency conflict without a matching task".into()))?;
    Ok(Enqueued {
        task: existing.try_into()?,
        deduplicated: true,
    })
}

/// EnqueueTasks: every item stored, deduplicated, or refused on its own.
pub(super) async fn batch(db: &Db, tasks: Vec<NewTask>) -> Result<Vec<Result<Enqueued>>> {
    let ids: Vec<TaskId> = tasks.iter().map(|_| TaskId::new_random()).collect();
    let owned = db.clone();
    let (tasks, ids, stored) = detached(async move {
        let stored = insert_batch(&owned, &tasks, &ids).await;
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
    let mut existing = existing_by_idempotency_key(db, &tasks, &inserted).await?;
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

/// The tasks already holding the idempotency keys of `tasks` that were not inserted.
async fn existing_by_idempotency_key(
    db: &Db,
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
        db,
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
