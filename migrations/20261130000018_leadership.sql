-- Sweeper leadership as a lease row (spec §6, §11), replacing the session advisory lock: a
-- transaction pooler (PgBouncer in transaction mode) hands a session's lock to whoever gets
-- the connection next, and Postgres-compatible distributed engines stub advisory locks out.
-- The holder renews its lease at every sweep; another replica takes over only once it
-- expired (or was given up at shutdown). `epoch` grows by one at every change of holder.
CREATE TABLE leadership (
    role       text        PRIMARY KEY,
    holder     uuid        NOT NULL,
    epoch      bigint      NOT NULL,
    expires_at timestamptz NOT NULL
);
