-- Several runtimes' claims in one statement, as the replica's shared claims run them
-- (src/store/postgres/shared_claims.rs), planned once per connection. A new function: older
-- binaries do not call it.
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
