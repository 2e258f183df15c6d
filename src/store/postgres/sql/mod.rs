//! The SQL the PostgreSQL store issues. Every owner write repeats the claim token and the
//! state guard in its WHERE clause; zero rows means "you no longer hold this" (or a replay),
//! which the caller then classifies with `domain::fence::judge`.
//!
//! This file holds the worker's path (runtimes, the claim, the fenced writes, failures) and
//! the fragments the others share; `tasks` holds enqueue, reads, bulk changes and queues;
//! `sweep` the sweeper's stages and the server's own failures.

/// Upsert by name. $6 is the new runtime token's digest: the one it replaces joins the
/// revoked ones (the latest $7 are kept).
pub(super) const REGISTER_RUNTIME: &str = "
INSERT INTO runtimes (id, name, queues, labels, max_concurrency, status, last_seen_at, registered_at,
                      token_digest)
VALUES ($1, $2, $3, $4, $5, 'ONLINE', now(), now(), $6)
ON CONFLICT (name) DO UPDATE SET
    queues          = EXCLUDED.queues,
    labels          = EXCLUDED.labels,
    max_concurrency = EXCLUDED.max_concurrency,
    status          = 'ONLINE',
    last_seen_at    = now(),
    offline_since   = NULL,
    token_digest    = EXCLUDED.token_digest,
    revoked_token_digests = (CASE WHEN runtimes.token_digest IS NULL THEN '{}'::bytea[]
                                  ELSE ARRAY[runtimes.token_digest] END
                             || runtimes.revoked_token_digests)[1:$7]
RETURNING *";

pub(super) const HEARTBEAT: &str = "
UPDATE runtimes SET last_seen_at = now(), status = 'ONLINE', offline_since = NULL
WHERE id = $1
RETURNING last_seen_at, status";

/// A runtime's max_concurrency and its DISPATCHED + RUNNING tasks.
pub(super) const RUNTIME_CAPACITY: &str = "
SELECT r.max_concurrency,
       (SELECT count(*) FROM tasks t
        WHERE t.claimed_by = r.id AND t.status IN ('DISPATCHED', 'RUNNING'))
FROM runtimes r WHERE r.id = $1";

/// Signs of life other than heartbeats: ONLINE runtimes only (an OFFLINE one comes back by
/// a heartbeat or a claim). Rows are locked in id order, so replicas touching overlapping
/// sets at once cannot deadlock.
pub(super) const TOUCH_RUNTIMES: &str = "
UPDATE runtimes r SET last_seen_at = now()
FROM (SELECT id FROM runtimes WHERE id = ANY ($1) AND status = 'ONLINE'
      ORDER BY id FOR NO KEY UPDATE) AS seen
WHERE r.id = seen.id AND r.status = 'ONLINE'
RETURNING r.id";

/// The claim, for one runtime or several in one statement (`shared_claims`): $1 runtimes,
/// $2 max_tasks, $3 auto_start, $4 budgets, one element per claim; $5 lease, $6
/// max_lease_expirations. `functions/leasehold_claim_many.sql` holds the whole contract in its
/// header: the preflight, the claim's rules, how one walk is dealt to several claims, the order
/// of the returned rows, the LH001/LH002 errors, and OFFLINE runtimes brought back ONLINE (a
/// claim is a sign of life, so nothing it claims can be failed by the sweeper for a stale
/// status). `request` says which claim (1-based) a row answers. No ORDER BY: a function scan
/// returns the rows in the order the function produced them (a sort, not being stable, could
/// reorder a claim's rows).
pub(super) const CLAIM_MANY: &str = "
SELECT claims.request_number AS request, (claims.task_row).*
FROM leasehold_claim_many($1, $2, $3, $4, $5, $6) AS claims";

/// The row as a fenced write sees it, with the database clock that judges its lease.
pub(super) const FENCE_SNAPSHOT: &str = "SELECT *, now() AS db_now FROM tasks WHERE id = $1";

/// StartTask for one task or several at once (see `coalesce`): $1 ids, $2 tokens, $3 acting
/// runtimes (NULL: any); each row is written only while its token holds a live DISPATCHED
/// claim of that runtime.
///
/// Each task is found by its id, whatever the statistics say: the status it must have is a
/// sub-select, which the planner cannot see through, so it cannot use the partial indexes of
/// held tasks. With the status written out, statistics taken while none was held (an idle
/// night) made the held-tasks index look empty, and every start of a busy day read all of its
/// entries (tests/it/plans.rs). The same holds for COMPLETE_MANY.
pub(super) const START_MANY: &str = "
UPDATE tasks t SET status = 'RUNNING', started_at = now()
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[]) AS w(id, token, holder)
WHERE t.id = w.id AND t.claim_token = w.token AND (w.holder IS NULL OR t.claimed_by = w.holder)
  AND t.status = (SELECT 'DISPATCHED') AND t.lease_expires_at >= now()
RETURNING t.*";

pub(super) const EXTEND_LEASE: &str = "
UPDATE tasks SET lease_expires_at = GREATEST(lease_expires_at, now() + $3)
WHERE id = $1 AND claim_token = $2
  AND status = 'DISPATCHED' AND lease_expires_at >= now()
  AND ($4::uuid IS NULL OR claimed_by = $4)
RETURNING lease_expires_at, claimed_by";

/// CompleteTask for one task or several at once (see `coalesce`): $1 ids, $2 tokens, $3 results,
/// $4 acting runtimes (NULL: any); each row is written only while its token holds it RUNNING
/// for that runtime. Found by id whatever the statistics say, as in START_MANY.
pub(super) const COMPLETE_MANY: &str = "
UPDATE tasks t SET status = 'COMPLETED', result = w.result, finished_at = now(),
                   lease_expires_at = NULL
FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::uuid[]) AS w(id, token, result, holder)
WHERE t.id = w.id AND t.claim_token = w.token AND t.status = (SELECT 'RUNNING')
  AND (w.holder IS NULL OR t.claimed_by = w.holder)
RETURNING t.*";

/// The retry delay in milliseconds, as `RetryBackoff::delay`: `min(max, base * 2^(attempt-1))
/// * jitter`, from the parameters (or expressions) holding base, max and jitter.
macro_rules! retry_delay_ms {
    ($base:literal, $max:literal, $jitter:literal) => {
        concat!(
            "LEAST(",
            $max,
            "::float8, ",
            $base,
            "::float8 * power(2, LEAST(attempt - 1, 31))) * ",
            $jitter
        )
    };
}

/// What a failure writes (FailTask's and the server's alike), after a `decision` CTE `d`
/// with `retry` and `delay_ms`: retried, back to QUEUED after the delay with the next
/// attempt and the claim ended as `$claim_end`; otherwise FAILED for good.
macro_rules! failure_outcome {
    ($error:literal, $reason:literal, $claim_end:literal) => {
        concat!(
            "
    status               = CASE WHEN d.retry THEN 'QUEUED' ELSE 'FAILED' END,
    error                = ", $error, ",
    failure_reason       = ", $reason, ",
    finished_at          = CASE WHEN d.retry THEN NULL ELSE now() END,
    available_at         = CASE WHEN d.retry THEN now() + make_interval(secs => d.delay_ms / 1000.0)
                                ELSE t.available_at END,
    attempt              = CASE WHEN d.retry THEN t.attempt + 1 ELSE t.attempt END,
    previous_claim_token = CASE WHEN d.retry THEN t.claim_token ELSE t.previous_claim_token END,
    previous_claim_end   = CASE WHEN d.retry THEN ", $claim_end, " ELSE t.previous_claim_end END,
    claim_token          = CASE WHEN d.retry THEN NULL ELSE t.claim_token END,
    lease_expires_at     = NULL"
        )
    };
}

/// After a CTE `failed` holding the failed rows (as updated): one `task_failures` row per
/// failure, numbered by the attempt that failed (migration 21). A replayed failure changes no
/// row, so it records nothing.
macro_rules! record_failures {
    () => {
        "
recorded AS (
    INSERT INTO task_failures (task_id, attempt, reason, error)
    SELECT id, CASE WHEN status = 'QUEUED' THEN attempt - 1 ELSE attempt END,
           failure_reason, error
    FROM failed
)"
    };
}

/// $3 error, $4 retryable, $5 backoff base (ms), $6 backoff max (ms), $7 jitter in [0, 1).
/// The retry delay is `min(max, base * 2^(attempt-1)) * jitter`, as `RetryBackoff::delay`.
pub(super) const FAIL: &str = concat!(
    "
WITH decision AS (
    SELECT id, ($4 AND attempt < max_attempts) AS retry,
           ",
    retry_delay_ms!("$5", "$6", "$7"),
    " AS delay_ms
    FROM tasks WHERE id = $1
),
failed AS (
UPDATE tasks t SET",
    failure_outcome!("$3", "'TASK_ERROR'", "'RETRIED'"),
    "
FROM decision d
WHERE t.id = d.id AND t.claim_token = $2 AND ($8::uuid IS NULL OR t.claimed_by = $8)
  AND (t.status = 'RUNNING' OR (t.status = 'DISPATCHED' AND t.lease_expires_at >= now()))
RETURNING t.*
),",
    record_failures!(),
    "
SELECT * FROM failed"
);

/// Upserts the counters when the token holds an active claim; answers whether it did. The
/// owner row is share-locked so a concurrent finish cannot slip in between.
pub(super) const REPORT_USAGE: &str = "
WITH owner AS (
    SELECT id, claimed_by FROM tasks
    WHERE id = $1 AND claim_token = $2 AND ($5::uuid IS NULL OR claimed_by = $5)
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
SELECT EXISTS (SELECT 1 FROM owner) AS applied, (SELECT claimed_by FROM owner) AS holder,
       (SELECT count(*) FROM upserted) AS written";

/// Counters of this report that are already stored with the same value under this token.
pub(super) const MATCHING_USAGE: &str = "
SELECT count(*) FROM task_usage u
JOIN unnest($3::text[], $4::int8[]) AS counter(name, value)
  ON u.name = counter.name AND u.value = counter.value
WHERE u.task_id = $1 AND u.claim_token = $2";

pub(super) const TASK_STATUS: &str =
    "SELECT status, attempt, claimed_by, runtime_id FROM tasks WHERE id = $1";

/// The columns of a `TaskMove`.
macro_rules! task_move_columns {
    () => {
        "t.id, t.queue, t.runtime_id, t.status, t.available_at"
    };
}

pub(super) const RUNTIME_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM runtimes WHERE id = $1)";

/// $1 status (NULL: any), $2 the name a page starts after (NULL: the first), $3 page size.
pub(super) const LIST_RUNTIMES: &str = "
SELECT * FROM runtimes
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR name > $2)
ORDER BY name LIMIT $3";

/// Keeps `offline_since` of a runtime that was already OFFLINE: the pinned-orphan grace counts
/// from when it first went away.
pub(super) const DEREGISTER_RUNTIME: &str = "
UPDATE runtimes SET
    status        = 'OFFLINE',
    offline_since = CASE WHEN status = 'OFFLINE' THEN offline_since ELSE now() END
WHERE id = $1
RETURNING id";

/// T4'': the runtime's unstarted claims go back to QUEUED at once. Not a lease expiry, so
/// `lease_expirations` is unchanged and a late write with the old token gets CLAIM_SUPERSEDED.
pub(super) const REQUEUE_UNSTARTED: &str = concat!(
    "
UPDATE tasks t SET
    status               = 'QUEUED',
    previous_claim_token = t.claim_token,
    previous_claim_end   = 'REQUEUED',
    claim_token          = NULL,
    lease_expires_at     = NULL
WHERE t.claimed_by = $1 AND t.status = 'DISPATCHED'
RETURNING ",
    task_move_columns!()
);

/// One statement that fails the tasks `$picked` selects (and locks) for a server-side reason,
/// always retryable: back to QUEUED with the next attempt after a jittered backoff while
/// attempts remain, else FAILED. The claim ends; its token is remembered as `REQUEUED` (so a
/// late FailTask is not taken for a replay of the worker's own failure), or kept on the FAILED
/// row, where any write with it gets TASK_TERMINAL.
///
/// Parameters: $1 batch size, $2 backoff base (ms), $3 backoff max (ms), $4 failure reason,
/// $5 error text; the picking query may use $6 and later.
macro_rules! fail_for_server_reason {
    ($picked:expr) => {
        concat!(
            "
WITH picked AS (",
            $picked,
            "),
decision AS (
    SELECT t.id, t.attempt < t.max_attempts AS retry,
           ",
            retry_delay_ms!("$2", "$3", "random()"),
            " AS delay_ms
    FROM tasks t JOIN picked p ON p.id = t.id
),
failed AS (
UPDATE tasks t SET",
            failure_outcome!("$5", "$4", "'REQUEUED'"),
            "
FROM decision d
WHERE t.id = d.id AND t.status IN ('DISPATCHED', 'RUNNING')
RETURNING t.*
),",
            record_failures!(),
            "
SELECT ",
            task_move_columns!(),
            " FROM failed t"
        )
    };
}

/// See `ClaimHorizon`: the served queues, the time left on the earliest own lease and the
/// time until the next delayed task of those queues, in seconds on the database clock.
pub(super) const CLAIM_HORIZON: &str = "
SELECT r.queues,
       (SELECT EXTRACT(EPOCH FROM min(t.lease_expires_at) - now())::float8
        FROM tasks t WHERE t.claimed_by = r.id AND t.status = 'DISPATCHED') AS own_lease_secs,
       (SELECT EXTRACT(EPOCH FROM min(next.available_at) - now())::float8
        FROM unnest(r.queues) AS served(name)
        CROSS JOIN LATERAL (
            SELECT t.available_at FROM tasks t
            WHERE t.status = 'QUEUED' AND t.queue = served.name AND t.available_at > now()
            ORDER BY t.available_at
            LIMIT 1
        ) next) AS next_available_secs
FROM runtimes r WHERE r.id = $1";

/// T4': claims pushed on a claim stream that ended, as ($2 task, $3 token) pairs, go back to
/// QUEUED at once. Not counted toward the poison guard (spec §2): the task never ran, and a
/// flapping client must not fail a queue's tasks. A late start gets LEASE_EXPIRED.
pub(super) const EXPIRE_CLAIMS: &str = concat!(
    "
UPDATE tasks t SET
    status               = 'QUEUED',
    previous_claim_token = t.claim_token,
    previous_claim_end   = 'LEASE_EXPIRED',
    claim_token          = NULL,
    lease_expires_at     = NULL
FROM unnest($2::uuid[], $3::uuid[]) AS pushed(id, token)
WHERE t.id = pushed.id AND t.claim_token = pushed.token
  AND t.claimed_by = $1 AND t.status = 'DISPATCHED'
RETURNING ",
    task_move_columns!()
);

// After the shared macros, which the submodules use.
mod sweep;
mod tasks;

pub(super) use sweep::*;
pub(super) use tasks::*;
