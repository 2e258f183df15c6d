//! Enqueue, reads, bulk changes and queue settings.

pub(in crate::store::postgres) const ENQUEUE: &str = "
INSERT INTO tasks (id, queue, runtime_id, concurrency_key, priority, payload, metadata, status,
                   attempt, max_attempts, lease_expirations, idempotency_key,
                   execution_timeout_ms, created_at, available_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'QUEUED', 1, $8, 0, $9, $10, now(), now() + $11)
ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *";

pub(in crate::store::postgres) const KNOWN_RUNTIMES: &str =
    "SELECT id FROM runtimes WHERE id = ANY ($1)";

/// ENQUEUE for many tasks at once: one row per array position.
pub(in crate::store::postgres) const ENQUEUE_BATCH: &str = "
INSERT INTO tasks (id, queue, runtime_id, concurrency_key, priority, payload, metadata, status,
                   attempt, max_attempts, lease_expirations, idempotency_key,
                   execution_timeout_ms, created_at, available_at)
SELECT n.id, n.queue, n.runtime_id, n.concurrency_key, n.priority, n.payload, n.metadata,
       'QUEUED', 1, n.max_attempts, 0, n.idempotency_key, n.execution_timeout_ms, now(),
       now() + make_interval(secs => n.delay_ms / 1000.0)
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::int4[], $6::bytea[],
            $7::jsonb[], $8::int8[], $9::text[], $10::int8[], $11::float8[])
     AS n(id, queue, runtime_id, concurrency_key, priority, payload, metadata, max_attempts,
          idempotency_key, execution_timeout_ms, delay_ms)
ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *";

pub(in crate::store::postgres) const BY_IDEMPOTENCY_KEYS: &str = "
SELECT t.* FROM tasks t
JOIN unnest($1::text[], $2::text[]) AS k(queue, idempotency_key)
  ON t.queue = k.queue AND t.idempotency_key = k.idempotency_key";

pub(in crate::store::postgres) const BY_IDEMPOTENCY_KEY: &str =
    "SELECT * FROM tasks WHERE queue = $1 AND idempotency_key = $2";

pub(in crate::store::postgres) const GET_TASK: &str = "SELECT * FROM tasks WHERE id = $1";

/// A task's recorded failures, by attempt (migration 21).
pub(in crate::store::postgres) const TASK_FAILURES: &str = "
SELECT attempt, failed_at, reason, error FROM task_failures WHERE task_id = $1 ORDER BY failed_at";

/// A task's usage counters, summed over its claims.
pub(in crate::store::postgres) const TASK_USAGE: &str = "
SELECT name, sum(value)::bigint FROM task_usage WHERE task_id = $1 GROUP BY name ORDER BY name";

pub(in crate::store::postgres) const LIST_TASKS: &str = "
SELECT * FROM tasks
WHERE ($1::text IS NULL OR queue = $1)
  AND (cardinality($2::text[]) = 0 OR status = ANY ($2))
  AND ($3::uuid IS NULL OR runtime_id = $3 OR claimed_by = $3)
  AND ($4::timestamptz IS NULL OR (created_at, id) > ($4, $5::uuid))
  AND ($7::timestamptz IS NULL OR created_at >= $7)
  AND ($8::timestamptz IS NULL OR created_at < $8)
  AND ($9::text IS NULL OR idempotency_key = $9)
ORDER BY created_at, id
LIMIT $6";

/// CancelTask and CancelTasks: the active ones of `$1` become CANCELLED, rows locked in id
/// order (two bulk cancels never deadlock).
pub(in crate::store::postgres) const CANCEL_MANY: &str = "
UPDATE tasks SET status = 'CANCELLED', finished_at = now(), failure_reason = 'CANCELLED',
                 lease_expires_at = NULL
WHERE id IN (SELECT id FROM tasks
             WHERE id = ANY ($1::uuid[]) AND status IN ('QUEUED', 'DISPATCHED', 'RUNNING')
             ORDER BY id FOR UPDATE)
  AND status IN ('QUEUED', 'DISPATCHED', 'RUNNING')
RETURNING *";

/// Bulk operations' pages: ids of one queue's tasks in some statuses, pinned to or claimed by
/// a runtime if `$3`, in id order after `$4`.
pub(in crate::store::postgres) const MATCHING_TASK_IDS: &str = "
SELECT id FROM tasks
WHERE queue = $1 AND status = ANY ($2::text[])
  AND ($3::uuid IS NULL OR runtime_id = $3 OR claimed_by = $3)
  AND ($4::uuid IS NULL OR id > $4)
ORDER BY id
LIMIT $5";

/// T9 for the tasks of `$1` (RetryTask: one; RetryTasks: a batch). The finishing claim's
/// token (kept on a FAILED/CANCELLED row) is remembered as ended
/// by requeue, so its late writes get CLAIM_SUPERSEDED.
/// A redrive takes the task out of a terminal status: if the tally counted it, it is
/// subtracted there in the same statement (migration 16).
pub(in crate::store::postgres) const RETRY_MANY: &str = "
WITH progress AS (SELECT counted_through FROM finished_tally_progress FOR SHARE),
before AS (SELECT id, status, finished_at FROM tasks WHERE id = ANY ($1::uuid[])
           ORDER BY id FOR UPDATE),
redriven AS (
UPDATE tasks SET
    status               = 'QUEUED',
    attempt              = 1,
    lease_expirations    = 0,
    available_at         = now(),
    dispatched_at        = NULL,
    started_at           = NULL,
    finished_at          = NULL,
    lease_expires_at     = NULL,
    result               = NULL,
    error                = NULL,
    failure_reason       = NULL,
    previous_claim_token = COALESCE(claim_token, previous_claim_token),
    previous_claim_end   = CASE WHEN claim_token IS NULL THEN previous_claim_end ELSE 'REQUEUED' END,
    claim_token          = NULL
FROM before b
WHERE tasks.id = b.id AND tasks.status IN ('FAILED', 'CANCELLED')
RETURNING tasks.*, b.status AS status_before, b.finished_at AS finished_before
),
untallied AS (
    UPDATE queue_finished_tally q SET tasks = q.tasks - d.redriven
    FROM (SELECT r.queue, r.status_before, count(*) AS redriven
          FROM redriven r, progress p
          WHERE r.finished_before <= p.counted_through
          GROUP BY r.queue, r.status_before) d
    WHERE q.queue = d.queue AND q.status = d.status_before
)
SELECT * FROM redriven";

/// Constant in the queue's history (spec §11): active counts come from partial indexes of
/// active tasks (`tasks_claimable`, `tasks_held_by_queue`); finished counts are the sweeper's
/// tally plus the few finished since it last counted (`tasks_finished_by_queue`).
pub(in crate::store::postgres) const DESCRIBE_QUEUE: &str = "
WITH tallied AS (SELECT counted_through FROM finished_tally_progress)
SELECT
    COALESCE((SELECT max_concurrent FROM queues WHERE name = $1), 0) AS max_concurrent,
    COALESCE((SELECT paused FROM queues WHERE name = $1), false)     AS paused,
    (SELECT default_execution_timeout_ms FROM queues WHERE name = $1) AS default_execution_timeout_ms,
    (SELECT count(*) FROM tasks WHERE queue = $1 AND status = 'QUEUED')     AS queued,
    (SELECT count(*) FROM tasks WHERE queue = $1 AND status = 'DISPATCHED') AS dispatched,
    (SELECT count(*) FROM tasks WHERE queue = $1 AND status = 'RUNNING')    AS running,
    (SELECT COALESCE(sum(tasks), 0)::bigint FROM queue_finished_tally
        WHERE queue = $1 AND status = 'COMPLETED')
    + (SELECT count(*) FROM tasks, tallied WHERE queue = $1 AND status = 'COMPLETED'
        AND finished_at > tallied.counted_through) AS completed,
    (SELECT COALESCE(sum(tasks), 0)::bigint FROM queue_finished_tally
        WHERE queue = $1 AND status = 'FAILED')
    + (SELECT count(*) FROM tasks, tallied WHERE queue = $1 AND status = 'FAILED'
        AND finished_at > tallied.counted_through) AS failed,
    (SELECT COALESCE(sum(tasks), 0)::bigint FROM queue_finished_tally
        WHERE queue = $1 AND status = 'CANCELLED')
    + (SELECT count(*) FROM tasks, tallied WHERE queue = $1 AND status = 'CANCELLED'
        AND finished_at > tallied.counted_through) AS cancelled,
    (SELECT min(created_at) FROM tasks WHERE queue = $1 AND status = 'QUEUED') AS oldest_queued_at";

/// The queue gauges, refreshed every sweep: two parts, each along a partial index of active
/// tasks (`tasks_oldest_queued`, `tasks_held_by_queue`), so the cost follows the active tasks,
/// not the history (one `status IN (...)` over the table scanned all of it).
///
/// What it finds is also kept in `queue_snapshots` (migration 20) for the console; queues that
/// emptied are kept there at zero.
pub(in crate::store::postgres) const QUEUE_DEPTHS: &str = "
WITH depths AS (
SELECT queue,
       sum(queued)::bigint     AS queued,
       sum(dispatched)::bigint AS dispatched,
       sum(running)::bigint    AS running,
       min(oldest_queued_at)   AS oldest_queued_at
FROM (
    SELECT queue, count(*) AS queued, 0 AS dispatched, 0 AS running,
           min(created_at) AS oldest_queued_at
    FROM tasks WHERE status = 'QUEUED' GROUP BY queue
    UNION ALL
    SELECT queue, 0, count(*) FILTER (WHERE status = 'DISPATCHED'),
           count(*) FILTER (WHERE status = 'RUNNING'), NULL
    -- `queue IS NOT NULL` (always true) lets this use tasks_held_by_queue (migration 25).
    FROM tasks WHERE status IN ('DISPATCHED', 'RUNNING') AND queue IS NOT NULL GROUP BY queue
) AS parts
GROUP BY queue
),
kept AS (
    INSERT INTO queue_snapshots (queue, queued, dispatched, running, oldest_queued_at, taken_at)
    SELECT queue, queued, dispatched, running, oldest_queued_at, now() FROM depths
    ON CONFLICT (queue) DO UPDATE SET
        queued = EXCLUDED.queued, dispatched = EXCLUDED.dispatched, running = EXCLUDED.running,
        oldest_queued_at = EXCLUDED.oldest_queued_at, taken_at = EXCLUDED.taken_at
),
emptied AS (
    UPDATE queue_snapshots s SET
        queued = 0, dispatched = 0, running = 0, oldest_queued_at = NULL, taken_at = now()
    WHERE NOT EXISTS (SELECT 1 FROM depths d WHERE d.queue = s.queue)
)
SELECT queue, queued, dispatched, running,
       EXTRACT(EPOCH FROM now() - oldest_queued_at)::float8 AS oldest_queued_secs
FROM depths";

/// The console's queue page (migration 20): every known queue with its settings, its active
/// counts as of the last sweep (`counted_at`) and its finished counts as of the last tally.
/// Reads only the small per-queue tables.
pub(in crate::store::postgres) const QUEUE_OVERVIEW: &str = "
WITH names AS (
    SELECT name AS queue FROM queues
    UNION SELECT queue FROM queue_snapshots
    UNION SELECT queue FROM queue_finished_tally
),
finished AS (
    SELECT queue,
           COALESCE(sum(tasks) FILTER (WHERE status = 'COMPLETED'), 0)::bigint AS completed,
           COALESCE(sum(tasks) FILTER (WHERE status = 'FAILED'), 0)::bigint    AS failed,
           COALESCE(sum(tasks) FILTER (WHERE status = 'CANCELLED'), 0)::bigint AS cancelled
    FROM queue_finished_tally GROUP BY queue
)
SELECT n.queue                                AS name,
       COALESCE(q.max_concurrent, 0)          AS max_concurrent,
       COALESCE(q.paused, false)              AS paused,
       q.default_execution_timeout_ms,
       COALESCE(s.queued, 0)                  AS queued,
       COALESCE(s.dispatched, 0)              AS dispatched,
       COALESCE(s.running, 0)                 AS running,
       COALESCE(f.completed, 0)               AS completed,
       COALESCE(f.failed, 0)                  AS failed,
       COALESCE(f.cancelled, 0)               AS cancelled,
       s.oldest_queued_at,
       s.taken_at                             AS counted_at
FROM names n
LEFT JOIN queues q          ON q.name = n.queue
LEFT JOIN queue_snapshots s ON s.queue = n.queue
LEFT JOIN finished f        ON f.queue = n.queue
ORDER BY n.queue
LIMIT $1";

/// Tasks finished per queue and minute since $1 (the console's chart).
pub(in crate::store::postgres) const THROUGHPUT: &str = "
SELECT queue, minute, completed, failed FROM queue_minutes
WHERE minute >= $1 ORDER BY queue, minute";

/// $4: whether to set the execution-time default to $5 (NULL clears it).
pub(in crate::store::postgres) const UPDATE_QUEUE: &str = "
INSERT INTO queues (name, max_concurrent, paused, default_execution_timeout_ms)
VALUES ($1, COALESCE($2, 0), COALESCE($3, false), CASE WHEN $4 THEN $5::bigint END)
ON CONFLICT (name) DO UPDATE SET
    max_concurrent = COALESCE($2, queues.max_concurrent),
    paused         = COALESCE($3, queues.paused),
    default_execution_timeout_ms = CASE WHEN $4 THEN $5::bigint
                                        ELSE queues.default_execution_timeout_ms END,
    updated_at     = now()";
