CREATE TABLE tasks (
    id                   uuid PRIMARY KEY,
    queue                text NOT NULL,
    -- Pin: only this runtime may claim the task.
    runtime_id           uuid REFERENCES runtimes (id),
    concurrency_key      text,
    priority             integer NOT NULL DEFAULT 0,
    payload              bytea NOT NULL,
    metadata             jsonb NOT NULL DEFAULT '{}'::jsonb,
    status               text NOT NULL CHECK (status IN
                             ('QUEUED', 'DISPATCHED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    attempt              bigint NOT NULL DEFAULT 1,
    max_attempts         bigint NOT NULL,
    lease_expirations    bigint NOT NULL DEFAULT 0,
    -- Runtime of the current or last claim.
    claimed_by           uuid,
    -- The current claim's token. Kept after that claim finishes the task (COMPLETED/FAILED)
    -- so a replayed CompleteTask/FailTask is recognised; cleared when the claim ends by requeue.
    claim_token          uuid,
    -- The claim that ended by requeue most recently, and how it ended ('LEASE_EXPIRED',
    -- 'RETRIED', 'REQUEUED'). Lets a late write get LEASE_EXPIRED instead of CLAIM_SUPERSEDED,
    -- and lets a FailTask replay succeed after the task was retried.
    previous_claim_token uuid,
    previous_claim_end   text,
    idempotency_key      text,
    execution_timeout_ms bigint,
    created_at           timestamptz NOT NULL,
    available_at         timestamptz NOT NULL,
    dispatched_at        timestamptz,
    started_at           timestamptz,
    finished_at          timestamptz,
    lease_expires_at     timestamptz,
    result               bytea,
    error                text,
    failure_reason       text
);

-- Claim order within a queue: highest priority, then oldest, then id.
CREATE INDEX tasks_claimable ON tasks (queue, priority DESC, created_at, id)
    WHERE status = 'QUEUED';
-- The preflight looks up one runtime's outstanding leases.
CREATE INDEX tasks_dispatched_by_runtime ON tasks (claimed_by, lease_expires_at)
    WHERE status = 'DISPATCHED';
-- Queue caps count active tasks per queue.
CREATE INDEX tasks_active_by_queue ON tasks (queue)
    WHERE status IN ('DISPATCHED', 'RUNNING');
CREATE UNIQUE INDEX tasks_idempotency ON tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- ListTasks pages in (created_at, id) order.
CREATE INDEX tasks_listing ON tasks (created_at, id);

-- Usage counters, one row per counter of one claim: a report upserts, so sending the same
-- report twice changes nothing.
CREATE TABLE task_usage (
    task_id     uuid NOT NULL REFERENCES tasks (id),
    claim_token uuid NOT NULL,
    name        text NOT NULL,
    value       bigint NOT NULL,
    PRIMARY KEY (task_id, claim_token, name)
);
