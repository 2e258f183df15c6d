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
    v_runtime_of  runtimes[];  -- each claim's runtime, read once
    v_found       integer;
    v_wanted      integer[];   -- what each claim may still take
    v_left        integer;     -- their sum
    v_capped      text[];      -- capped queues among the served ones ...
    v_room        integer[];   -- ... and the room each has left
    v_ids         uuid[] := '{}';   -- the tasks dealt ...
    v_claim_of    integer[] := '{}';  -- ... and the claim each went to
    v_key_ids     uuid[] := '{}';   -- those with a concurrency key ...
    v_keys_taken  text[] := '{}';   -- ... and their keys, quoted with their queue
    v_walked      uuid[];             -- the walk, best first: ids ...
    v_queue_of    text[];             -- ... queues
    v_pin_of      uuid[];             -- ... pins
    v_key_of      text[];             -- ... keys, quoted with their queue (NULL: none)
    v_dealt       boolean[];
    v_served      text[];             -- the queues of the claim being dealt ...
    v_window      integer;            -- ... how many more candidates it looks at
    v_keys_before text[];             -- ... what earlier claims left it
    v_room_before integer[];
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

    -- What each claim may take: what it asks, and for a capped runtime no more than the slots
    -- its earlier claims here left free. The count runs after the row lock above, so it sees
    -- every committed claim of the runtime; it runs before the preflight, which may free
    -- slots: a claim then takes fewer, never more, and the next one sees them.
    SELECT array_agg(w.wanted ORDER BY w.n), coalesce(sum(w.wanted), 0), count(w.id),
           array_agg(w.runtime ORDER BY w.n)
    INTO v_wanted, v_left, v_found, v_runtime_of
    FROM (
        SELECT c.n, r.id, r AS runtime,
               (CASE WHEN r.max_concurrency > 0
                     THEN GREATEST(LEAST(c.asked, r.max_concurrency - h.held - c.asked_before), 0)
                     ELSE c.asked END)::integer AS wanted
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
        ) h ON true
    ) w;
    IF v_found < v_claims THEN
        RAISE EXCEPTION USING ERRCODE = 'LH001', MESSAGE = 'runtime not found';
    END IF;

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

    IF v_left > 0 THEN
        -- Claims on a capped queue serialise on its row, so the count below (a fresh
        -- snapshot) sees every committed claim. Uncapped queues take no lock at all.
        SELECT array_agg(q.name ORDER BY q.name) INTO v_capped
        FROM (SELECT name FROM queues
              WHERE max_concurrent > 0
                AND name IN (SELECT unnest((v_runtime_of[n]).queues)
                             FROM generate_subscripts(p_runtimes, 1) AS n
                             WHERE v_wanted[n] > 0)
              ORDER BY name
              FOR UPDATE) q;
        IF v_capped IS NOT NULL THEN
            SELECT array_agg(q.max_concurrent - (SELECT count(*) FROM tasks a
                                                 WHERE a.queue = q.name
                                                   AND a.status IN ('DISPATCHED', 'RUNNING'))
                             ORDER BY c.i)
            INTO v_room
            FROM unnest(v_capped) WITH ORDINALITY AS c(name, i)
            JOIN queues q ON q.name = c.name;
        END IF;
    END IF;

    -- The walk: each served queue's claim index in order, as deep as its claims ask (a queue
    -- already full is not walked). Rows locked here but dealt to no claim stay untouched and
    -- are released at commit.
    SELECT coalesce(array_agg(t.id ORDER BY t.priority DESC, t.created_at, t.id), '{}'),
           array_agg(t.queue ORDER BY t.priority DESC, t.created_at, t.id),
           array_agg(t.runtime_id ORDER BY t.priority DESC, t.created_at, t.id),
           array_agg(CASE WHEN t.concurrency_key IS NOT NULL
                          THEN format('%L %L', t.queue, t.concurrency_key) END
                     ORDER BY t.priority DESC, t.created_at, t.id)
    INTO v_walked, v_queue_of, v_pin_of, v_key_of
    FROM (
        SELECT s.name,
               CASE WHEN v_room[array_position(v_capped, s.name)] <= 0 THEN 0
                    ELSE sum(v_wanted[n]) END AS depth
        FROM generate_subscripts(p_runtimes, 1) AS n
        CROSS JOIN LATERAL unnest((v_runtime_of[n]).queues) AS s(name)
        WHERE v_wanted[n] > 0
        GROUP BY s.name
    ) served
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
        LIMIT served.depth
        FOR UPDATE OF w SKIP LOCKED
    ) t
    WHERE v_left > 0;
    v_dealt := array_fill(false, ARRAY[cardinality(v_walked)]);

    -- The deal, claim by claim in the order given, as if each claimed alone after the ones
    -- before it: it looks at the best v_wanted candidates of its queues (pinned ones only if
    -- pinned to it) that its own walk would have seen (not dealt before, key not held, queue
    -- not full), and takes those not blocked by its own picks: one task per concurrency key,
    -- no more than a capped queue's room. Fewer than asked, never more, as alone.
    FOR v_claim IN 1 .. v_claims LOOP
        v_window := v_wanted[v_claim];
        CONTINUE WHEN v_window <= 0;
        v_served := (v_runtime_of[v_claim]).queues;
        v_keys_before := v_keys_taken;
        v_room_before := v_room;
        FOR k IN 1 .. cardinality(v_walked) LOOP
            EXIT WHEN v_window = 0;
            CONTINUE WHEN v_dealt[k] OR NOT v_queue_of[k] = ANY (v_served)
                OR v_pin_of[k] <> p_runtimes[v_claim];
            v_cap := array_position(v_capped, v_queue_of[k]);
            CONTINUE WHEN v_room_before[v_cap] <= 0 OR v_key_of[k] = ANY (v_keys_before);
            v_window := v_window - 1;
            CONTINUE WHEN v_room[v_cap] <= 0 OR v_key_of[k] = ANY (v_keys_taken);
            v_dealt[k] := true;
            v_ids := v_ids || v_walked[k];
            v_claim_of := v_claim_of || v_claim;
            IF v_key_of[k] IS NOT NULL THEN
                v_keys_taken := v_keys_taken || v_key_of[k];
                v_key_ids := v_key_ids || v_walked[k];
            END IF;
            IF v_cap IS NOT NULL THEN
                v_room[v_cap] := v_room[v_cap] - 1;
            END IF;
        END LOOP;
    END LOOP;

    -- A task with a key is claimed only with its key's slot: a concurrent claim may have taken
    -- the slot since the walk looked, and then the task is left alone.
    IF cardinality(v_key_ids) > 0 THEN
        WITH slotted AS (
            INSERT INTO concurrency_slots (queue, key, task_id)
            SELECT t.queue, t.concurrency_key, t.id FROM tasks t WHERE t.id = ANY (v_key_ids)
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
