-- no-transaction
-- Replaced by tasks_held_by_runtime (migration 22).
DROP INDEX CONCURRENTLY IF EXISTS tasks_active_by_runtime;
