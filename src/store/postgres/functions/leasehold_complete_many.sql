-- leasehold_complete_many(ids, tokens, results, holders): CompleteTask for one task or several
-- at once (store/postgres/coalesce.rs, sql::COMPLETE_MANY). Element i completes task ids[i]
-- with results[i] while tokens[i] holds it RUNNING for runtime holders[i] (NULL: any
-- runtime); the others are left alone, and the caller judges them from a fresh snapshot
-- (fence.rs).
--
-- Returns: the completed rows (COMPLETED, finished_at = now(), no lease).
--
-- Why a function: as leasehold_start_many, its statement is planned once per connection
-- instead of again whenever the table's statistics change.
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

CREATE OR REPLACE FUNCTION leasehold_complete_many(
    p_ids     uuid[],
    p_tokens  uuid[],
    p_results bytea[],
    p_holders uuid[]
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
BEGIN
    RETURN QUERY
    UPDATE tasks t SET status = 'COMPLETED', result = w.result, finished_at = now(),
                       lease_expires_at = NULL
    FROM unnest(p_ids, p_tokens, p_results, p_holders) AS w(id, token, result, holder)
    WHERE t.id = w.id AND t.claim_token = w.token AND t.status = 'RUNNING'
      AND (w.holder IS NULL OR t.claimed_by = w.holder)
    RETURNING t.*;
END
$$;
