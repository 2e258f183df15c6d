-- no-transaction
-- Replaced by tasks_dispatched_since (migration 27).
DROP INDEX CONCURRENTLY IF EXISTS tasks_dispatched_at;
