-- no-transaction
-- tasks_dispatched_at again (the sweeper's dispatch timeouts: `dispatched_at < …`), with a
-- predicate the preflight cannot prove, for the reason migration 25 gives: otherwise, with
-- statistics of an idle table, the preflight may read every DISPATCHED task along it.
-- Migration 28 drops the old one.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_dispatched_since ON tasks (dispatched_at)
    WHERE status = 'DISPATCHED' AND dispatched_at IS NOT NULL;
