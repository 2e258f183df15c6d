//! The sweeper's stages (spec §6), retention and the tally (§11), the sweep's leadership,
//! and the server's own failures of held tasks (RecoverOrphans, offline runtimes, timeouts).

/// RecoverOrphans: $6 the runtime.
pub(in crate::store::postgres) const FAIL_ORPHANS: &str = fail_for_server_reason!(
    "SELECT id FROM tasks WHERE claimed_by = $6 AND status IN ('DISPATCHED', 'RUNNING')
     LIMIT $1 FOR UPDATE"
);

/// Sweeper stage 2: tasks held by OFFLINE runtimes.
pub(in crate::store::postgres) const FAIL_OFFLINE_RUNTIME_TASKS: &str = fail_for_server_reason!(
    "SELECT t.id FROM tasks t JOIN runtimes r ON r.id = t.claimed_by
     WHERE t.status IN ('DISPATCHED', 'RUNNING') AND r.status = 'OFFLINE'
     LIMIT $1 FOR UPDATE OF t SKIP LOCKED"
);

/// Sweeper stage 3: dispatched for longer than $6.
pub(in crate::store::postgres) const FAIL_DISPATCH_TIMEOUTS: &str = fail_for_server_reason!(
    "SELECT id FROM tasks WHERE status = 'DISPATCHED' AND dispatched_at < now() - $6::interval
     LIMIT $1 FOR UPDATE SKIP LOCKED"
);

/// Sweeper stage 3: running past the task's own execution timeout.
pub(in crate::store::postgres) const FAIL_EXECUTION_TIMEOUTS: &str = fail_for_server_reason!(
    "SELECT id FROM tasks
     WHERE status = 'RUNNING' AND execution_timeout_ms IS NOT NULL
       AND started_at + make_interval(secs => execution_timeout_ms / 1000.0) < now()
     LIMIT $1 FOR UPDATE SKIP LOCKED"
);

/// A queue's execution-time default: sweeper stage 3, for RUNNING tasks without their own
/// timeout (spec §11). Walks the active tasks of the queues that set one.
pub(in crate::store::postgres) const FAIL_QUEUE_DEFAULT_EXECUTION_TIMEOUTS: &str = fail_for_server_reason!(
    "SELECT t.id FROM queues q JOIN tasks t ON t.queue = q.name
     WHERE q.default_execution_timeout_ms IS NOT NULL
       AND t.status = 'RUNNING' AND t.execution_timeout_ms IS NULL
       AND t.started_at + make_interval(secs => q.default_execution_timeout_ms / 1000.0) < now()
     LIMIT $1 FOR UPDATE OF t SKIP LOCKED"
);

/// Retention (spec §11): up to $2 tasks finished more than $1 ago, oldest first, deleted with
/// their usage rows; those the tally already counted are subtracted from it. Returns how
/// many were deleted. See migration 16 for why the progress row is locked.
pub(in crate::store::postgres) const DELETE_EXPIRED_FINISHED: &str = "
WITH progress AS (SELECT counted_through FROM finished_tally_progress FOR SHARE),
doomed AS (
    SELECT id FROM tasks
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND finished_at < now() - $1::interval
    ORDER BY finished_at
    LIMIT $2 FOR UPDATE SKIP LOCKED
),
usage_gone AS (DELETE FROM task_usage u USING doomed d WHERE u.task_id = d.id),
failures_gone AS (DELETE FROM task_failures f USING doomed d WHERE f.task_id = d.id),
gone AS (
    DELETE FROM tasks t USING doomed d WHERE t.id = d.id
    RETURNING t.queue, t.status, t.finished_at
),
counted AS (
    SELECT g.queue, g.status, count(*) AS n FROM gone g, progress p
    WHERE g.finished_at <= p.counted_through
    GROUP BY g.queue, g.status
),
untallied AS (
    UPDATE queue_finished_tally q SET tasks = q.tasks - c.n FROM counted c
    WHERE q.queue = c.queue AND q.status = c.status
)
SELECT count(*) FROM gone";

/// The tally's lock, taken first in its transaction so the tally's own statement sees every
/// redrive and deletion that got the progress row before it (migration 16).
pub(in crate::store::postgres) const LOCK_TALLY: &str =
    "SELECT 1 FROM finished_tally_progress FOR UPDATE";

/// Counts the tasks finished after the last tally and at least $1 (the settle time) ago into
/// queue_finished_tally, and moves the watermark. Returns how many tasks it counted.
pub(in crate::store::postgres) const TALLY_FINISHED: &str = "
WITH bounds AS (
    SELECT counted_through AS since, now() - $1::interval AS through FROM finished_tally_progress
),
fresh AS (
    SELECT t.queue, t.status, count(*) AS n
    FROM tasks t, bounds b
    WHERE t.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
      AND t.finished_at > b.since AND t.finished_at <= b.through
    GROUP BY t.queue, t.status
),
added AS (
    INSERT INTO queue_finished_tally (queue, status, tasks)
    SELECT queue, status, n FROM fresh
    ON CONFLICT (queue, status) DO UPDATE SET tasks = queue_finished_tally.tasks + EXCLUDED.tasks
),
moved AS (
    UPDATE finished_tally_progress p SET counted_through = b.through
    FROM bounds b WHERE b.through > p.counted_through
)
SELECT COALESCE(sum(n), 0)::bigint FROM fresh";

/// Counts the tasks finished after the last count and at least $1 ago into `queue_minutes`,
/// moves the watermark and drops minutes older than a day (migration 20). Returns how many
/// tasks it counted.
pub(in crate::store::postgres) const COUNT_MINUTES: &str = "
WITH bounds AS (
    SELECT counted_through AS since, now() - $1::interval AS through
    FROM queue_minutes_progress FOR UPDATE
),
fresh AS (
    SELECT t.queue, date_trunc('minute', t.finished_at) AS minute,
           count(*) FILTER (WHERE t.status = 'COMPLETED') AS completed,
           count(*) FILTER (WHERE t.status = 'FAILED')    AS failed,
           count(*) FILTER (WHERE t.status = 'CANCELLED') AS cancelled
    FROM tasks t, bounds b
    WHERE t.status IN ('COMPLETED', 'FAILED', 'CANCELLED')
      AND t.finished_at > b.since AND t.finished_at <= b.through
    GROUP BY 1, 2
),
added AS (
    INSERT INTO queue_minutes (queue, minute, completed, failed, cancelled)
    SELECT queue, minute, completed, failed, cancelled FROM fresh
    ON CONFLICT (queue, minute) DO UPDATE SET
        completed = queue_minutes.completed + EXCLUDED.completed,
        failed    = queue_minutes.failed + EXCLUDED.failed,
        cancelled = queue_minutes.cancelled + EXCLUDED.cancelled
),
moved AS (
    UPDATE queue_minutes_progress p SET counted_through = b.through
    FROM bounds b WHERE b.through > p.counted_through
),
pruned AS (
    DELETE FROM queue_minutes WHERE minute < now() - interval '1 day'
)
SELECT COALESCE(sum(completed + failed + cancelled), 0)::bigint FROM fresh";

/// Only one replica sweeps at a time: the holder of the `leadership` row's unexpired lease.
/// Takes or renews it for $2 (holder $1); returns the epoch and the database's clock when this
/// replica leads, no row when another does. One statement, so it is safe behind a
/// transaction pooler.
pub(in crate::store::postgres) const TRY_LEAD: &str = "
INSERT INTO leadership AS l (role, holder, epoch, expires_at)
VALUES ('sweeper', $1, 1, now() + $2::interval)
ON CONFLICT (role) DO UPDATE SET
    holder     = EXCLUDED.holder,
    epoch      = l.epoch + CASE WHEN l.holder = EXCLUDED.holder THEN 0 ELSE 1 END,
    expires_at = EXCLUDED.expires_at
WHERE l.holder = EXCLUDED.holder OR l.expires_at < now()
RETURNING epoch, now()";

/// Gives the lease up (at shutdown), so another replica sweeps at its next tick.
pub(in crate::store::postgres) const STEP_DOWN: &str = "
UPDATE leadership SET expires_at = now() WHERE role = 'sweeper' AND holder = $1";

/// Before stage 1: when the previous sweep (on any replica) began, as milliseconds ago, and
/// this sweep's start recorded in its place. NULL on the first sweep.
pub(in crate::store::postgres) const RECORD_SWEEP_START: &str = "
WITH previous AS (SELECT swept_at FROM sweep_progress)
INSERT INTO sweep_progress (singleton, swept_at) VALUES (true, now())
ON CONFLICT (singleton) DO UPDATE SET swept_at = EXCLUDED.swept_at
RETURNING (SELECT extract(epoch FROM now() - swept_at) * 1000 FROM previous)::float8";

/// A blackout of $1 does not count against ONLINE runtimes (never past now).
pub(in crate::store::postgres) const CREDIT_BLACKOUT: &str = "
UPDATE runtimes SET last_seen_at = LEAST(now(), last_seen_at + $1::interval)
WHERE status = 'ONLINE'";

/// Sweeper stage 1, part one: ONLINE runtimes whose `last_seen_at` is older than $1, with its
/// age in milliseconds, except those already judged undecided in this sweep ($3).
pub(in crate::store::postgres) const STALE_RUNTIMES: &str = "
SELECT id, (extract(epoch FROM now() - last_seen_at) * 1000)::float8 FROM runtimes
WHERE status = 'ONLINE' AND last_seen_at < now() - $1::interval AND NOT (id = ANY ($3))
ORDER BY last_seen_at
LIMIT $2";

/// Sweeper stage 1, part two: the same predicate again, so a heartbeat that landed since the
/// first part vetoes the flip.
pub(in crate::store::postgres) const MARK_OFFLINE: &str = "
UPDATE runtimes SET status = 'OFFLINE', offline_since = now()
WHERE id = ANY ($1) AND status = 'ONLINE' AND last_seen_at < now() - $2::interval
RETURNING id";

/// Sweeper stage 1: runtimes Redis saw recently although their row is stale ($1 ids, $2 how
/// many milliseconds ago Redis saw each).
pub(in crate::store::postgres) const REFRESH_LAST_SEEN: &str = "
UPDATE runtimes r
SET last_seen_at = GREATEST(r.last_seen_at, now() - make_interval(secs => seen.ago_ms / 1000.0))
FROM unnest($1::uuid[], $2::float8[]) AS seen(id, ago_ms)
WHERE r.id = seen.id AND r.status = 'ONLINE'";

/// Sweeper stage 4: QUEUED tasks pinned to a runtime OFFLINE for longer than $2. Not retried:
/// nobody else may run them.
pub(in crate::store::postgres) const FAIL_PINNED_ORPHANS: &str = concat!(
    "
WITH picked AS (
    SELECT t.id FROM tasks t JOIN runtimes r ON r.id = t.runtime_id
    WHERE t.status = 'QUEUED' AND r.status = 'OFFLINE' AND r.offline_since < now() - $2::interval
    LIMIT $1 FOR UPDATE OF t SKIP LOCKED
)
UPDATE tasks t SET
    status         = 'FAILED',
    failure_reason = 'RUNTIME_GONE',
    error          = 'the pinned runtime has been offline for longer than the grace',
    finished_at    = now()
FROM picked p
WHERE t.id = p.id AND t.status = 'QUEUED'
RETURNING ",
    task_move_columns!()
);

/// Sweeper stage 5: one task per (queue, pin) among those that became available in ($1, $2].
pub(in crate::store::postgres) const BECAME_AVAILABLE: &str = concat!(
    "
SELECT DISTINCT ON (t.queue, t.runtime_id) ",
    task_move_columns!(),
    "
FROM tasks t
WHERE t.status = 'QUEUED' AND t.available_at > $1 AND t.available_at <= $2"
);
