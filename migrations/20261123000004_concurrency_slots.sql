-- At most one DISPATCHED/RUNNING task per (queue, concurrency_key). The claim statement takes a
-- slot with INSERT ... ON CONFLICT DO NOTHING: a racing claimer that picked another task with
-- the same key waits for the first to commit, then finds the slot taken and skips its task.
-- A snapshot-based NOT EXISTS check alone would let both claimers through.
CREATE TABLE concurrency_slots (
    queue   text NOT NULL,
    key     text NOT NULL,
    task_id uuid NOT NULL UNIQUE,
    PRIMARY KEY (queue, key)
);

-- Frees the slot whenever a keyed task leaves DISPATCHED/RUNNING, whichever code path moved
-- it (complete, fail, retry, requeue, cancel, sweeper), so no path can forget to.
CREATE FUNCTION leasehold_release_concurrency_slot() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM concurrency_slots WHERE task_id = OLD.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_release_concurrency_slot
    AFTER UPDATE OF status ON tasks
    FOR EACH ROW
    WHEN (OLD.concurrency_key IS NOT NULL
          AND OLD.status IN ('DISPATCHED', 'RUNNING')
          AND NEW.status NOT IN ('DISPATCHED', 'RUNNING'))
    EXECUTE FUNCTION leasehold_release_concurrency_slot();
