-- no-transaction
-- DescribeQueue no longer counts per (queue, status) over the whole table: active counts use
-- the partial indexes tasks_claimable and tasks_active_by_queue, finished counts the tally.
-- Every state change wrote an entry here; it is one index fewer per task (older binaries
-- still run without it: their DescribeQueue just reads more).
DROP INDEX CONCURRENTLY IF EXISTS tasks_queue_status;
