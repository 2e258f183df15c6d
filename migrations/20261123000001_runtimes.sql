-- Worker endpoints. A runtime is registered by its unique name; re-registering keeps its id.
CREATE TABLE runtimes (
    id              uuid PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    queues          text[] NOT NULL,
    labels          jsonb NOT NULL DEFAULT '{}'::jsonb,
    max_concurrency bigint NOT NULL DEFAULT 0,
    status          text NOT NULL CHECK (status IN ('ONLINE', 'OFFLINE')),
    last_seen_at    timestamptz NOT NULL,
    registered_at   timestamptz NOT NULL
);
