-- Every failure of a task, one row per attempt, for the console's timeline: the task row keeps
-- only the latest error. Written in the same statement as the failure (FailTask and the
-- server's own failures: offline runtimes, timeouts, recovery); deleted with the task by
-- retention. No foreign key: the failure path stays one statement without a key check. A
-- redriven task starts again at attempt 1, so attempts repeat; the time tells them apart.
CREATE TABLE task_failures (
    task_id   uuid NOT NULL,
    attempt   integer NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    reason    text NOT NULL,
    error     text,
    PRIMARY KEY (task_id, failed_at)
);
