-- The operator console's queue page reads two small tables, never the tasks table (spec §11:
-- its cost follows the number of queues, not the history). The sweeping replica writes both,
-- so every replica shows the same figures and they survive restarts.
--
-- queue_snapshots: each queue's active counts and oldest QUEUED task, as the sweep's queue
-- depth query last found them (the same query that refreshes the Prometheus gauges).
CREATE TABLE queue_snapshots (
    queue            text PRIMARY KEY,
    queued           bigint NOT NULL,
    dispatched       bigint NOT NULL,
    running          bigint NOT NULL,
    oldest_queued_at timestamptz,
    taken_at         timestamptz NOT NULL
);

-- queue_minutes: tasks finished per queue and minute (by finished_at), counted once by the
-- sweep up to `counted_through` (a few seconds short of now, so a finishing transaction that
-- started before the watermark has committed), kept for a day. A chart, not an account: a
-- redrive does not take a failure back out of the minute it happened in.
CREATE TABLE queue_minutes (
    queue     text NOT NULL,
    minute    timestamptz NOT NULL,
    completed bigint NOT NULL DEFAULT 0,
    failed    bigint NOT NULL DEFAULT 0,
    cancelled bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, minute)
);

CREATE TABLE queue_minutes_progress (
    counted_through timestamptz NOT NULL
);
INSERT INTO queue_minutes_progress (counted_through) VALUES (now());
