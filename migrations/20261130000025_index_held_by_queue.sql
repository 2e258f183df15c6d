-- no-transaction
-- tasks_active_by_queue again (queue caps and DescribeQueue count a queue's held tasks), with a
-- predicate only a statement that names the queue can prove (`queue = $1` implies `queue IS
-- NOT NULL`). Why: after statistics taken while nothing was held (an idle night), every
-- partial index over held tasks looks empty, hence free to read whole, and the planner took
-- this one for the preflight's and the capacity check's lookups by runtime: each claim then
-- read every held task of every runtime. Now tasks_held_by_runtime is the only index those
-- statements can use (tests/it/plans.rs). Migration 26 drops the old one.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_held_by_queue ON tasks (queue)
    WHERE status IN ('DISPATCHED', 'RUNNING') AND queue IS NOT NULL;
