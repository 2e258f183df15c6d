-- leasehold_claim_within_capacity(runtime, max_tasks, lease, max_lease_expirations, budget,
-- auto_start): a claim as binaries before migration 30 made it. Same arguments, rows and
-- errors as leasehold_claim, which it wraps.
--
-- Kept for binaries older than migration 30, which call it (expand/contract, migration 12):
-- this release claims with leasehold_claim_many alone. Drop it in a contract step once no
-- such binary runs.
--
-- A runtime never holds more than its max_concurrency DISPATCHED + RUNNING tasks (0 = no
-- limit), also when its claims race (spec §10): claims of a capped runtime serialise on its
-- row, count what it holds with a fresh snapshot, and ask leasehold_claim for no more than the
-- free slots. (The count is taken before the preflight, which may free slots: a claim then
-- takes fewer, never more; the next one sees them.) Uncapped runtimes lock nothing.
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

CREATE OR REPLACE FUNCTION leasehold_claim_within_capacity(
    p_runtime               uuid,
    p_max_tasks             integer,
    p_lease                 interval,
    p_max_lease_expirations bigint,
    p_budget                interval,
    p_auto_start            boolean DEFAULT false
) RETURNS SETOF tasks
LANGUAGE plpgsql AS $$
DECLARE
    v_max  bigint;
    v_held bigint;
BEGIN
    SELECT max_concurrency INTO v_max FROM runtimes WHERE id = p_runtime;
    IF v_max > 0 AND p_max_tasks > 0 THEN
        PERFORM 1 FROM runtimes WHERE id = p_runtime FOR NO KEY UPDATE;
        SELECT count(*) INTO v_held FROM tasks
        WHERE claimed_by = p_runtime AND status IN ('DISPATCHED', 'RUNNING');
        p_max_tasks := LEAST(p_max_tasks, GREATEST(v_max - v_held, 0))::integer;
    END IF;
    RETURN QUERY SELECT * FROM leasehold_claim(p_runtime, p_max_tasks, p_lease,
                                               p_max_lease_expirations, p_budget,
                                               p_auto_start);
END
$$;
