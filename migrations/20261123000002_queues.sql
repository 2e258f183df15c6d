-- Per-queue settings. A queue exists implicitly once a task names it; a row here only holds
-- settings that differ from the defaults (no cap, not paused).
CREATE TABLE queues (
    name           text PRIMARY KEY,
    max_concurrent bigint NOT NULL DEFAULT 0 CHECK (max_concurrent >= 0),
    paused         boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
