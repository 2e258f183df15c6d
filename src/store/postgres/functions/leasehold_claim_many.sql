-- leasehold_claim_many(runtimes, max_tasks, auto_start, budgets, lease, max_lease_expirations):
-- the claim statement (store/postgres/sql CLAIM_MANY), for one runtime's claim or several
-- (shared_claims.rs). Claim i is leasehold_claim_within_capacity(runtimes[i], max_tasks[i],
-- lease, max_lease_expirations, budgets[i], auto_start[i]), run in turn: each call's statements
-- take fresh snapshots, so a later claim sees what an earlier one took. Same rules, preflight,
-- row order and errors as a lone claim; an error rolls back every claim of the call.
--
-- First, every OFFLINE runtime among them comes back ONLINE: a claim is a sign of life, so
-- nothing it claims can be failed by the sweeper for a stale status.
--
-- Returns: each claim's rows, as a lone claim returns them, tagged with its 1-based number
-- (request_number), claims in the order given.
--
-- Plans: generic, made once per connection, without JIT (leasehold_claim.sql says why); a
-- statement with arrays as parameters is otherwise planned afresh on every call.
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

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
BEGIN
    UPDATE runtimes SET status = 'ONLINE', last_seen_at = now(), offline_since = NULL
    WHERE id = ANY (p_runtimes) AND status = 'OFFLINE';

    FOR i IN 1 .. coalesce(array_length(p_runtimes, 1), 0) LOOP
        RETURN QUERY
        SELECT i, claimed
        FROM leasehold_claim_within_capacity(p_runtimes[i], p_max_tasks[i], p_lease,
                                             p_max_lease_expirations, p_budgets[i],
                                             p_auto_start[i]) AS claimed;
    END LOOP;
END
$$;
