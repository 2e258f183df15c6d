-- Credentials (spec §9). Secrets are never stored: only their SHA-256 digests.

-- API keys: `lhk_<id>_<secret>`.
CREATE TABLE api_keys (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    scopes        text[] NOT NULL,
    secret_digest bytea NOT NULL,
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz,
    -- Written at most once a minute per replica.
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

-- Runtime tokens: `lhr_<runtime id>_<secret>`. Registering a name again replaces the digest;
-- the replaced ones are kept (the last few) so their holders learn they were revoked rather
-- than that their token is unknown.
ALTER TABLE runtimes
    ADD COLUMN token_digest bytea,
    ADD COLUMN revoked_token_digests bytea[] NOT NULL DEFAULT '{}';
