-- Several runtimes' claims walk the queues once (the preflight, capacity counts and the claim's
-- statements run once per call, not once per claim): same arguments, rows and errors as
-- before, so binaries that call it already need nothing new. leasehold_claim and
-- leasehold_claim_within_capacity stay for binaries older than migration 30.
-- The body is src/store/postgres/functions/leasehold_claim_many.sql (tests/it/schema_functions.rs).
CREATE OR REPLACE FUNCTION leasehold_claim_many(
    p_runtimes              uuid[],
    p_max_tasks             integer[],
    p_auto_start            boolean[],
    p_budgets               interval[],
    p_lease                 interval,
    p_max_lease_expirations bigint
) RETURNS TABLE (request_number integer, task_row tasks)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
DECLARE
    v_claims      integer := coalesce(array_length(p_runtimes, 1), 0);
    v_found       integer;
    v_wanted      integer[];   -- what each claim may still take
    v_left        integer;     -- their sum
    v_capped      text[];      -- capped queues among the served ones ...
    v_room        integer[];   -- ... and the room each has left
    v_ids         uuid[] := '{}';   -- the tasks dealt ...
    v_claim_of    integer[] := '{}';  -- ... and the claim each went to
    v_key_queues  text[] := '{}';     -- the (queue, concurrency_key) of those with a key
    v_keys        text[] := '{}';
    v_key_ids     uuid[] := '{}';
    v_keys_taken  text[] := '{}';     -- those keys, quoted, to look them up
    v_key         text;
    v_candidate   record;
    v_cap         integer;
    v_claim       integer;
BEGIN
    UPDATE runtimes SET status = 'ONLINE', last_seen_at = now(), offline_since = NULL
    WHERE id = ANY (p_runtimes) AND status = 'OFFLINE';

    -- Runtimes first, then tasks, then queues: the order every claim locks in.
    PERFORM 1 FROM runtimes
    WHERE id = ANY (p_runtimes) AND max_concurrency > 0
    ORDER BY id
    FOR NO KEY UPDATE;

    -- T4: only these runtimes' own expired leases go back to QUEUED. The poison guard (T10)
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
    WHERE claimed_by = ANY (p_runtimes)
      AND status = 'DISPATCHED'
      AND lease_expires_at < now()
    RETURNING array_position(p_runtimes, tasks.claimed_by), tasks;

    -- What each claim may take: what it asks, and for a capped runtime no more than the slots
    -- its earlier claims here left free. The count runs after the row lock above, so it sees
    -- every committed claim of the runtime.
    SELECT array_agg(CASE WHEN r.max_concurrency > 0
                          THEN GREATEST(LEAST(c.asked, r.max_concurrency - h.held - c.asked_before), 0)
                          ELSE c.asked END
                     ORDER BY c.n)::integer[],
           count(r.id)
    INTO v_wanted, v_found
    FROM (SELECT n, p_runtimes[n] AS runtime, GREATEST(p_max_tasks[n], 0) AS asked,
                 coalesce(sum(GREATEST(p_max_tasks[n], 0))
                              OVER (PARTITION BY p_runtimes[n] ORDER BY n
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)
                     AS asked_before
          FROM generate_subscripts(p_runtimes, 1) AS n) c
    LEFT JOIN runtimes r ON r.id = c.runtime
    LEFT JOIN LATERAL (
        SELECT count(*) AS held FROM tasks t
        WHERE r.max_concurrency > 0
          AND t.claimed_by = r.id AND t.status IN ('DISPATCHED', 'RUNNING')
    ) h ON true;
    IF v_found < v_claims THEN
        RAISE EXCEPTION USING ERRCODE = 'LH001', MESSAGE = 'runtime not found';
    END IF;
    v_left := coalesce((SELECT sum(w) FROM unnest(v_wanted) AS w), 0);

    IF v_left > 0 THEN
        -- Claims on a capped queue serialise on its row, so the count below (a fresh
        -- snapshot) sees every committed claim. Uncapped queues take no lock at all.
        PERFORM 1 FROM queues
        WHERE max_concurrent > 0
          AND name IN (SELECT unnest(r.queues) FROM runtimes r
                       JOIN generate_subscripts(p_runtimes, 1) AS n ON r.id = p_runtimes[n]
                       WHERE v_wanted[n] > 0)
        ORDER BY name
        FOR UPDATE;
        IF FOUND THEN
            SELECT array_agg(q.name),
                   array_agg(q.max_concurrent - (SELECT count(*) FROM tasks a
                                                 WHERE a.queue = q.name
                                                   AND a.status IN ('DISPATCHED', 'RUNNING')))
            INTO v_capped, v_room
            FROM queues q
            WHERE q.max_concurrent > 0
              AND q.name IN (SELECT unnest(r.queues) FROM runtimes r
                             JOIN generate_subscripts(p_runtimes, 1) AS n ON r.id = p_runtimes[n]
                             WHERE v_wanted[n] > 0);
        END IF;
    END IF;

    -- The walk: each served queue's claim index in order, as far as its claims (and its room)
    -- could take, then every candidate best first with the claims serving its queue. Rows
    -- locked here but dealt to no claim stay untouched and are released at commit.
    FOR v_candidate IN
        WITH served AS (
            SELECT s.name,
                   LEAST(sum(v_wanted[n]), v_room[array_position(v_capped, s.name)]) AS walk,
                   array_agg(n ORDER BY n) AS takers
            FROM generate_subscripts(p_runtimes, 1) AS n
            JOIN runtimes r ON r.id = p_runtimes[n]
            CROSS JOIN LATERAL unnest(r.queues) AS s(name)
            WHERE v_wanted[n] > 0
            GROUP BY s.name
        )
        SELECT t.id, t.queue, t.runtime_id, t.concurrency_key, served.takers
        FROM served
        CROSS JOIN LATERAL (
            SELECT w.id, w.queue, w.runtime_id, w.concurrency_key, w.priority, w.created_at
            FROM tasks w
            WHERE w.status = 'QUEUED'
              AND w.queue = served.name
              AND (w.runtime_id IS NULL OR w.runtime_id = ANY (p_runtimes))
              AND w.available_at <= now()
              AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.name = served.name AND q.paused)
              AND (w.concurrency_key IS NULL
                   OR NOT EXISTS (SELECT 1 FROM concurrency_slots s
                                  WHERE s.queue = w.queue AND s.key = w.concurrency_key))
            ORDER BY w.priority DESC, w.created_at, w.id
            LIMIT GREATEST(served.walk, 0)
            FOR UPDATE OF w SKIP LOCKED
        ) t
        WHERE v_left > 0
        ORDER BY t.priority DESC, t.created_at, t.id
    LOOP
        -- At most one task per concurrency key in one call; no more than a capped queue's room.
        v_cap := array_position(v_capped, v_candidate.queue);
        CONTINUE WHEN v_cap IS NOT NULL AND v_room[v_cap] <= 0;
        IF v_candidate.concurrency_key IS NOT NULL THEN
            v_key := format('%L %L', v_candidate.queue, v_candidate.concurrency_key);
            CONTINUE WHEN v_key = ANY (v_keys_taken);
        END IF;
        FOREACH v_claim IN ARRAY v_candidate.takers LOOP
            CONTINUE WHEN v_wanted[v_claim] <= 0
                OR v_candidate.runtime_id <> p_runtimes[v_claim];  -- pinned to another
            v_ids := v_ids || v_candidate.id;
            v_claim_of := v_claim_of || v_claim;
            v_wanted[v_claim] := v_wanted[v_claim] - 1;
            v_left := v_left - 1;
            IF v_candidate.concurrency_key IS NOT NULL THEN
                v_keys_taken := v_keys_taken || v_key;
                v_key_queues := v_key_queues || v_candidate.queue;
                v_keys := v_keys || v_candidate.concurrency_key;
                v_key_ids := v_key_ids || v_candidate.id;
            END IF;
            IF v_cap IS NOT NULL THEN
                v_room[v_cap] := v_room[v_cap] - 1;
            END IF;
            EXIT;
        END LOOP;
        EXIT WHEN v_left = 0;
    END LOOP;

    -- A task with a key is claimed only with its key's slot: a concurrent claim may have taken
    -- the slot since the walk looked, and then the task is left alone.
    IF cardinality(v_key_ids) > 0 THEN
        WITH slotted AS (
            INSERT INTO concurrency_slots (queue, key, task_id)
            SELECT * FROM unnest(v_key_queues, v_keys, v_key_ids)
            ON CONFLICT DO NOTHING
            RETURNING task_id
        )
        SELECT coalesce(array_agg(d.id ORDER BY d.rank), '{}'),
               coalesce(array_agg(d.claim ORDER BY d.rank), '{}')
        INTO v_ids, v_claim_of
        FROM unnest(v_ids, v_claim_of) WITH ORDINALITY AS d(id, claim, rank)
        WHERE d.id <> ALL (v_key_ids) OR d.id IN (SELECT task_id FROM slotted);
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE tasks t SET
            status           = CASE WHEN p_auto_start[d.claim] THEN 'RUNNING' ELSE 'DISPATCHED' END,
            claim_token      = gen_random_uuid(),
            claimed_by       = p_runtimes[d.claim],
            dispatched_at    = now(),
            started_at       = CASE WHEN p_auto_start[d.claim] THEN now() ELSE t.started_at END,
            lease_expires_at = now() + p_lease
        FROM unnest(v_ids, v_claim_of) AS d(id, claim)
        WHERE t.id = d.id
        RETURNING d.claim, t
    )
    SELECT c.claim, c.t FROM claimed c
    ORDER BY c.claim, (c.t).priority DESC, (c.t).created_at, (c.t).id;

    IF EXISTS (SELECT 1 FROM unnest(p_budgets) AS b(budget)
               WHERE clock_timestamp() > statement_timestamp() + b.budget) THEN
        RAISE EXCEPTION USING ERRCODE = 'LH002', MESSAGE = 'claim deadline passed before commit';
    END IF;
END
$$;
