-- Which binaries may run against this schema (spec §11, docs/operations.md "Migrations").
-- A binary refuses to start when the newest migration it knows is older than
-- `oldest_compatible`. Expand steps leave it alone; a contract step (dropping or renaming what
-- an older binary still reads or writes) raises it to the version of the migration that
-- introduced the replacement, and lands only after every older binary is gone.
CREATE TABLE schema_compatibility (
    only_row          boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    oldest_compatible bigint  NOT NULL
);
INSERT INTO schema_compatibility (oldest_compatible) VALUES (20261123000001);
