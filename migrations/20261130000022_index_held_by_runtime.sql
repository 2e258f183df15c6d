-- no-transaction
-- One index for a runtime's held tasks, replacing two (migrations 23 and 24 drop them): the
-- preflight finds its own expired leases (claimed_by, 'DISPATCHED', lease_expires_at <), the
-- capacity check and the sweeper count or fail what a runtime holds (claimed_by, status IN).
-- A claim writes one entry here where it wrote two. One statement per file: CONCURRENTLY
-- cannot run in a transaction (docs/operations.md, "Migrations").
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_held_by_runtime
    ON tasks (claimed_by, status, lease_expires_at)
    WHERE status IN ('DISPATCHED', 'RUNNING');
