-- no-transaction
-- DescribeQueue counts a queue's tasks finished since the sweeper's last tally from here
-- (index-only where the visibility map allows); older ones come from queue_finished_tally.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished_by_queue ON tasks (queue, status, finished_at)
    WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED');
