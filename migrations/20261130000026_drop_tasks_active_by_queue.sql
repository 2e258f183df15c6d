-- no-transaction
-- Replaced by tasks_held_by_queue (migration 25).
DROP INDEX CONCURRENTLY IF EXISTS tasks_active_by_queue;
