-- no-transaction
-- Retention deletes the oldest finished tasks first, and the sweeper tallies newly finished
-- ones (spec §11). Built CONCURRENTLY so writes to tasks go on meanwhile (docs/operations.md,
-- "Migrations"): one statement per file, since CONCURRENTLY cannot run in a transaction. If
-- the build is interrupted, drop the INVALID index it left and run the migration again.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished ON tasks (finished_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');
