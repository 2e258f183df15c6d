-- leasehold_claim(runtime, max_tasks, lease, max_lease_expirations, budget, auto_start): one
-- claim call in one round trip (spec §4, T2 and T4), as binaries before migration 30 made
-- it, through leasehold_claim_within_capacity.
--
-- Kept for binaries older than migration 30, which call it (expand/contract, migration 12):
-- this release claims with leasehold_claim_many alone. Drop it in a contract step once no
-- such binary runs.
--
-- What it does, in one transaction with its caller's statement:
--   1. The preflight (T4): this runtime's own DISPATCHED tasks whose lease expired go back to
--      QUEUED (previous_claim_end = LEASE_EXPIRED); the poison guard (T10) FAILS one whose
--      lease has now expired more than max_lease_expirations times (LEASE_EXPIRED_TOO_OFTEN).
--   2. The claim (T2): up to max_tasks QUEUED, available tasks of the runtime's queues (or
--      pinned to it), best first (priority DESC, created_at, id), walked along the partial
--      index tasks_claimable per queue and taken FOR UPDATE SKIP LOCKED; paused queues are
--      skipped, a capped queue (max_concurrent) gives no more than its room (claims on it
--      serialise on its row), one task per (queue, concurrency_key) holds a concurrency_slots
--      row. Each becomes DISPATCHED with a fresh claim_token and lease_expires_at = now() + lease;
--      with auto_start (StreamClaims' open option, docs/semantics.md) RUNNING instead, with
--      started_at = now(): the claim is the start, and no StartTask write follows.
--
-- Returns: the preflight's rows (QUEUED or FAILED) first, then the claimed rows (DISPATCHED, or
-- RUNNING with auto_start), the latter in claim order. Callers tell them apart by status.
--
-- Errors, with leasehold's own SQLSTATEs (store/postgres/errors.rs maps them):
--   LH001  the runtime does not exist (RUNTIME_NOT_FOUND)
--   LH002  the budget ran out before commit; everything is rolled back (DEADLINE_EXCEEDED)
--
-- Plans: every statement here runs a generic plan, made once per connection
-- (plan_cache_mode = force_generic_plan). Otherwise the claim's LIMIT p_max_tasks made the
-- generic plan look dear and PostgreSQL planned the claim afresh on every call, which cost as
-- much CPU as running it (docs/PERFORMANCE.md). JIT is off: a generic plan's row estimates
-- (a tenth of the queue for the LIMIT) would otherwise compile every claim, for ~0.6 s.
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

CREATE OR REPLACE FUNCTION leasehold_claim(
    p_runtime               uuid,
    p_max_tasks             integer,
    p_lease                 interval,
    p_max_lease_expirations bigint,
    p_budget                interval,
    p_auto_start            boolean DEFAULT false
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
DECLARE
    v_queues text[];
BEGIN
    SELECT queues INTO v_queues FROM runtimes WHERE id = p_runtime;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'LH001', MESSAGE = 'runtime not found';
    END IF;

    -- T4: only this runtime's own expired leases go back to QUEUED. The poison guard (T10)
    -- fails a task whose lease has now expired more than p_max_lease_expirations times.
    RETURN QUERY
    UPDATE tasks SET
        status               = CASE WHEN lease_expirations + 1 > p_max_lease_expirations
                                    THEN 'FAILED' ELSE 'QUEUED' END,
        failure_reason       = CASE WHEN lease_expirations + 1 > p_max_lease_expirations
                                    THEN 'LEASE_EXPIRED_TOO_OFTEN' ELSE failure_reason END,
        error                = CASE WHEN lease_expirations + 1 > p_max_lease_expirations
                                    THEN format('lease expired %s times', lease_expirations + 1)
                                    ELSE error END,
        finished_at          = CASE WHEN lease_expirations + 1 > p_max_lease_expirations
                                    THEN now() END,
        lease_expirations    = lease_expirations + 1,
        previous_claim_token = claim_token,
        previous_claim_end   = 'LEASE_EXPIRED',
        claim_token          = NULL,
        lease_expires_at     = NULL
    WHERE claimed_by = p_runtime
      AND status = 'DISPATCHED'
      AND lease_expires_at < now()
    RETURNING *;

    IF p_max_tasks <= 0 THEN
        RETURN;
    END IF;

    -- Claims on a capped queue serialise on its row, so the statement below (which takes a
    -- fresh snapshot) counts every committed claim. Uncapped queues take no lock at all.
    PERFORM 1 FROM queues
    WHERE name = ANY (v_queues) AND max_concurrent > 0
    ORDER BY name
    FOR UPDATE;

    RETURN QUERY
    WITH capped AS (
        SELECT q.name,
               q.max_concurrent - (SELECT count(*) FROM tasks a
                                   WHERE a.queue = q.name
                                     AND a.status IN ('DISPATCHED', 'RUNNING')) AS room
        FROM queues q
        WHERE q.name = ANY (v_queues) AND q.max_concurrent > 0
    ),
    -- Walk each served queue's claim index in order (a plain `queue = ANY (...)` would sort
    -- every QUEUED row of those queues on each claim), then keep the best p_max overall.
    -- Rows locked here but not kept stay untouched and are released at commit.
    candidates AS (
        SELECT c.*
        FROM unnest(v_queues) AS served(name)
        CROSS JOIN LATERAL (
            SELECT t.id, t.queue, t.concurrency_key, t.priority, t.created_at
            FROM tasks t
            WHERE t.status = 'QUEUED'
              AND t.queue = served.name
              AND (t.runtime_id IS NULL OR t.runtime_id = p_runtime)
              AND t.available_at <= now()
              AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = served.name AND q.paused)
              AND NOT EXISTS (SELECT 1 FROM capped c WHERE c.name = served.name AND c.room <= 0)
              AND (t.concurrency_key IS NULL
                   OR NOT EXISTS (SELECT 1 FROM concurrency_slots s
                                  WHERE s.queue = t.queue AND s.key = t.concurrency_key))
            ORDER BY t.priority DESC, t.created_at, t.id
            LIMIT p_max_tasks
            FOR UPDATE OF t SKIP LOCKED
        ) c
        ORDER BY c.priority DESC, c.created_at, c.id
        LIMIT p_max_tasks
    ),
    -- At most one task per concurrency key in one batch.
    first_of_key AS (
        SELECT c.*,
               row_number() OVER (PARTITION BY c.queue, c.concurrency_key
                                  ORDER BY c.priority DESC, c.created_at, c.id) AS key_rank
        FROM candidates c
    ),
    -- No more tasks from a capped queue than it has room for.
    within_cap AS (
        SELECT f.id, f.queue, f.concurrency_key,
               row_number() OVER (PARTITION BY f.queue
                                  ORDER BY f.priority DESC, f.created_at, f.id) AS queue_rank
        FROM first_of_key f
        WHERE f.concurrency_key IS NULL OR f.key_rank = 1
    ),
    chosen AS (
        SELECT w.id, w.concurrency_key
        FROM within_cap w
        LEFT JOIN capped c ON c.name = w.queue
        WHERE c.room IS NULL OR w.queue_rank <= c.room
    ),
    slots AS (
        INSERT INTO concurrency_slots (queue, key, task_id)
        SELECT t.queue, t.concurrency_key, t.id
        FROM tasks t JOIN chosen c ON c.id = t.id
        WHERE t.concurrency_key IS NOT NULL
        ON CONFLICT DO NOTHING
        RETURNING task_id
    ),
    claimed AS (
        UPDATE tasks t SET
            status           = CASE WHEN p_auto_start THEN 'RUNNING' ELSE 'DISPATCHED' END,
            claim_token      = gen_random_uuid(),
            claimed_by       = p_runtime,
            dispatched_at    = now(),
            started_at       = CASE WHEN p_auto_start THEN now() ELSE t.started_at END,
            lease_expires_at = now() + p_lease
        FROM chosen c
        WHERE t.id = c.id
          AND (c.concurrency_key IS NULL OR c.id IN (SELECT task_id FROM slots))
        RETURNING t.*
    )
    SELECT * FROM claimed ORDER BY priority DESC, created_at, id;

    IF p_budget IS NOT NULL AND clock_timestamp() > statement_timestamp() + p_budget THEN
        RAISE EXCEPTION USING ERRCODE = 'LH002', MESSAGE = 'claim deadline passed before commit';
    END IF;
END
$$;
