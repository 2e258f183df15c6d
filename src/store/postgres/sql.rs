//! The SQL the PostgreSQL store issues. Every owner write repeats the claim token and the
//! state guard in its WHERE clause; zero rows means "you no longer hold this" (or a replay),
//! which the caller then classifies with `domain::fence::judge`.

pub(super) const REGISTER_RUNTIME: &str = "
INSERT INTO runtimes (id, name, queues, labels, max_concurrency, status, last_seen_at, registered_at)
VALUES ($1, $2, $3, $4, $5, 'ONLINE', now(), now())
ON CONFLICT (name) DO UPDATE SET
    queues          = EXCLUDED.queues,
    labels          = EXCLUDED.labels,
    max_concurrency = EXCLUDED.max_concurrency,
    status          = 'ONLINE',
    last_seen_at    = now()
RETURNING *";

pub(super) const HEARTBEAT: &str = "
UPDATE runtimes SET last_seen_at = now(), status = 'ONLINE'
WHERE id = $1
RETURNING last_seen_at, status";

pub(super) const CLAIM: &str = "SELECT * FROM leasehold_claim($1, $2, $3, $4, $5)";

/// The row as a fenced write sees it, with the database clock that judges its lease.
pub(super) const FENCE_SNAPSHOT: &str = "SELECT *, now() AS db_now FROM tasks WHERE id = $1";

pub(super) const START: &str = "
UPDATE tasks SET status = 'RUNNING', started_at = now()
WHERE id = $1 AND claim_token = $2
  AND status = 'DISPATCHED' AND lease_expires_at >= now()
RETURNING *";

pub(super) const EXTEND_LEASE: &str = "
UPDATE tasks SET lease_expires_at = GREATEST(lease_expires_at, now() + $3)
WHERE id = $1 AND claim_token = $2
  AND status = 'DISPATCHED' AND lease_expires_at >= now()
RETURNING lease_expires_at";

pub(super) const COMPLETE: &str = "
UPDATE tasks SET status = 'COMPLETED', result = $3, finished_at = now(), lease_expires_at = NULL
WHERE id = $1 AND claim_token = $2 AND status = 'RUNNING'
RETURNING *";

/// $3 error, $4 retryable, $5 backoff base (ms), $6 backoff max (ms), $7 jitter in [0, 1).
/// The retry delay is `min(max, base * 2^(attempt-1)) * jitter`, as `RetryBackoff::delay`.
pub(super) const FAIL: &str = "
WITH decision AS (
    SELECT id, ($4 AND attempt < max_attempts) AS retry,
           LEAST($6::float8, $5::float8 * power(2, LEAST(attempt - 1, 31))) * $7::float8 AS delay_ms
    FROM tasks WHERE id = $1
)
UPDATE tasks t SET
    status               = CASE WHEN d.retry THEN 'QUEUED' ELSE 'FAILED' END,
    error                = $3,
    failure_reason       = 'TASK_ERROR',
    finished_at          = CASE WHEN d.retry THEN NULL ELSE now() END,
    available_at         = CASE WHEN d.retry THEN now() + make_interval(secs => d.delay_ms / 1000.0)
                                ELSE t.available_at END,
    attempt              = CASE WHEN d.retry THEN t.attempt + 1 ELSE t.attempt END,
    previous_claim_token = CASE WHEN d.retry THEN t.claim_token ELSE t.previous_claim_token END,
    previous_claim_end   = CASE WHEN d.retry THEN 'RETRIED' ELSE t.previous_claim_end END,
    claim_token          = CASE WHEN d.retry THEN NULL ELSE t.claim_token END,
    lease_expires_at     = NULL
FROM decision d
WHERE t.id = d.id AND t.claim_token = $2
  AND (t.status = 'RUNNING' OR (t.status = 'DISPATCHED' AND t.lease_expires_at >= now()))
RETURNING t.*";

/// Upserts the counters when the token holds an active claim; answers whether it did. The
/// owner row is share-locked so a concurrent finish cannot slip in between.
pub(super) const REPORT_USAGE: &str = "
WITH owner AS (
    SELECT id FROM tasks
    WHERE id = $1 AND claim_token = $2
      AND (status = 'RUNNING' OR (status = 'DISPATCHED' AND lease_expires_at >= now()))
    FOR SHARE
),
upserted AS (
    INSERT INTO task_usage (task_id, claim_token, name, value)
    SELECT owner.id, $2, counter.name, counter.value
    FROM owner, unnest($3::text[], $4::int8[]) AS counter(name, value)
    ON CONFLICT (task_id, claim_token, name) DO UPDATE SET value = EXCLUDED.value
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM owner) AS applied, (SELECT count(*) FROM upserted) AS written";

/// Counters of this report that are already stored with the same value under this token.
pub(super) const MATCHING_USAGE: &str = "
SELECT count(*) FROM task_usage u
JOIN unnest($3::text[], $4::int8[]) AS counter(name, value)
  ON u.name = counter.name AND u.value = counter.value
WHERE u.task_id = $1 AND u.claim_token = $2";

pub(super) const TASK_STATUS: &str = "SELECT status, attempt FROM tasks WHERE id = $1";

pub(super) const ENQUEUE: &str = "
INSERT INTO tasks (id, queue, runtime_id, concurrency_key, priority, payload, metadata, status,
                   attempt, max_attempts, lease_expirations, idempotency_key,
                   execution_timeout_ms, created_at, available_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'QUEUED', 1, $8, 0, $9, $10, now(), now() + $11)
ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING *";

pub(super) const BY_IDEMPOTENCY_KEY: &str =
    "SELECT * FROM tasks WHERE queue = $1 AND idempotency_key = $2";

pub(super) const GET_TASK: &str = "SELECT * FROM tasks WHERE id = $1";

pub(super) const LIST_TASKS: &str = "
SELECT * FROM tasks
WHERE ($1::text IS NULL OR queue = $1)
  AND (cardinality($2::text[]) = 0 OR status = ANY ($2))
  AND ($3::uuid IS NULL OR runtime_id = $3 OR claimed_by = $3)
  AND ($4::timestamptz IS NULL OR (created_at, id) > ($4, $5::uuid))
ORDER BY created_at, id
LIMIT $6";

pub(super) const CANCEL: &str = "
UPDATE tasks SET status = 'CANCELLED', finished_at = now(), failure_reason = 'CANCELLED',
                 lease_expires_at = NULL
WHERE id = $1 AND status IN ('QUEUED', 'DISPATCHED', 'RUNNING')
RETURNING *";

pub(super) const DESCRIBE_QUEUE: &str = "
SELECT
    COALESCE((SELECT max_concurrent FROM queues WHERE name = $1), 0) AS max_concurrent,
    COALESCE((SELECT paused FROM queues WHERE name = $1), false)     AS paused,
    count(*) FILTER (WHERE status = 'QUEUED')     AS queued,
    count(*) FILTER (WHERE status = 'DISPATCHED') AS dispatched,
    count(*) FILTER (WHERE status = 'RUNNING')    AS running,
    count(*) FILTER (WHERE status = 'COMPLETED')  AS completed,
    count(*) FILTER (WHERE status = 'FAILED')     AS failed,
    count(*) FILTER (WHERE status = 'CANCELLED')  AS cancelled,
    min(created_at) FILTER (WHERE status = 'QUEUED') AS oldest_queued_at
FROM tasks WHERE queue = $1";

pub(super) const UPDATE_QUEUE: &str = "
INSERT INTO queues (name, max_concurrent, paused)
VALUES ($1, COALESCE($2, 0), COALESCE($3, false))
ON CONFLICT (name) DO UPDATE SET
    max_concurrent = COALESCE($2, queues.max_concurrent),
    paused         = COALESCE($3, queues.paused),
    updated_at     = now()";
