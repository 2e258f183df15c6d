-- DescribeQueue in constant time whatever the history (spec §11): finished tasks are counted
-- once, by the sweeper, into queue_finished_tally, up to `counted_through`; DescribeQueue adds
-- the few finished after that from tasks_finished_by_queue. Every change to a counted row
-- keeps the tally exact in the same statement: retention subtracts what it deletes, a redrive
-- (FAILED/CANCELLED → QUEUED) what it takes out of a terminal status.
--
-- The tally stops some minutes short of now (the settle time, in the sweeper): a task's
-- finished_at is its transaction's start, so a row finished just before the watermark may
-- commit just after it; waiting longer than any such transaction takes means none is missed.
-- Each writer locks the progress row first (tally: FOR UPDATE; retention and redrive: FOR
-- SHARE), so a tally never counts a row a concurrent redrive or deletion did not subtract.
CREATE TABLE finished_tally_progress (
    only_row        boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    counted_through timestamptz NOT NULL
);

CREATE TABLE queue_finished_tally (
    queue  text   NOT NULL,
    status text   NOT NULL CHECK (status IN ('COMPLETED', 'FAILED', 'CANCELLED')),
    tasks  bigint NOT NULL,
    PRIMARY KEY (queue, status)
);

-- The history so far, counted once (the only full count of finished tasks there is).
INSERT INTO finished_tally_progress (counted_through) VALUES (now() - interval '5 minutes');
INSERT INTO queue_finished_tally (queue, status, tasks)
SELECT queue, status, count(*)
FROM tasks
WHERE status IN ('COMPLETED', 'FAILED', 'CANCELLED')
  AND finished_at <= (SELECT counted_through FROM finished_tally_progress)
GROUP BY queue, status;
