-- leasehold_start_many(ids, tokens, holders): StartTask for one task or several at once
-- (store/postgres/coalesce.rs, sql::START_MANY). Element i starts task ids[i] while tokens[i]
-- holds a live DISPATCHED claim of it, of runtime holders[i] (NULL: any runtime); the others
-- are left alone, and the caller judges them from a fresh snapshot (fence.rs).
--
-- Returns: the started rows (RUNNING, started_at = now()).
--
-- Why a function: its statement is planned once per connection (plan_cache_mode =
-- force_generic_plan). Sent as a prepared statement, PostgreSQL planned it afresh whenever
-- the table's statistics changed (five custom plans per connection, each time), which under
-- load cost a fifth of the statement's own time (docs/PERFORMANCE.md).
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

CREATE OR REPLACE FUNCTION leasehold_start_many(
    p_ids     uuid[],
    p_tokens  uuid[],
    p_holders uuid[]
) RETURNS SETOF tasks
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET jit = off
AS $$
BEGIN
    RETURN QUERY
    UPDATE tasks t SET status = 'RUNNING', started_at = now()
    FROM unnest(p_ids, p_tokens, p_holders) AS w(id, token, holder)
    WHERE t.id = w.id AND t.claim_token = w.token
      AND (w.holder IS NULL OR t.claimed_by = w.holder)
      AND t.status = 'DISPATCHED' AND t.lease_expires_at >= now()
    RETURNING t.*;
END
$$;
