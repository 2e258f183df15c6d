-- StartTask's and CompleteTask's group-commit statements as functions planned once per
-- connection (generic plans): new functions, so older binaries, which send the statements
-- themselves, need nothing new.
-- The bodies are src/store/postgres/functions/leasehold_start_many.sql and
-- leasehold_complete_many.sql (tests/it/schema_functions.rs).
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
