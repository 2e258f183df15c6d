-- leasehold_release_concurrency_slot(): the trigger function of tasks_release_concurrency_slot
-- (AFTER UPDATE OF status ON tasks, for a keyed task leaving DISPATCHED/RUNNING). It frees the
-- task's concurrency_slots row whichever code path moved it (complete, fail, retry, requeue,
-- cancel, sweeper), so no path can forget to.
--
-- This file is the function's one source: the database must hold exactly this body
-- (tests/it/schema_functions.rs compares them). To change the function, change this file and
-- add a migration with the same CREATE OR REPLACE; the test fails until both agree.

CREATE OR REPLACE FUNCTION leasehold_release_concurrency_slot() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM concurrency_slots WHERE task_id = OLD.id;
    RETURN NULL;
END
$$;
