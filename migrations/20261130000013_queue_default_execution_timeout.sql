-- A queue's execution-time default (spec §11): a RUNNING task without its own
-- execution_timeout is failed as EXECUTION_TIMEOUT once it ran this long. NULL = none.
-- Adding a nullable column without a default rewrites nothing and locks only briefly.
ALTER TABLE queues ADD COLUMN default_execution_timeout_ms bigint
    CHECK (default_execution_timeout_ms > 0);
