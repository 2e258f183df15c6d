-- DescribeQueue counts each status of one queue from this index (index-only where the
-- visibility map allows) instead of scanning the table.
CREATE INDEX tasks_queue_status ON tasks (queue, status);
-- The oldest QUEUED task of a queue is the first entry here.
CREATE INDEX tasks_oldest_queued ON tasks (queue, created_at) WHERE status = 'QUEUED';
