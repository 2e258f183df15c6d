-- When the latest sweep began, on whichever replica led it. A sweep that finds the previous
-- one much older than the sweep interval knows that no replica could sweep in between (the
-- database was unreachable, or every replica was down): that time is not counted against
-- runtimes' liveness (spec §6).
CREATE TABLE sweep_progress (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    swept_at  timestamptz NOT NULL
);
