//! API keys and runtime tokens on PostgreSQL (spec §9): digests only, never secrets.

use super::pooler::{Db, run};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::errors::plain;
use super::interval;
use crate::domain::auth::{ApiKey, Grant, SecretDigest};
use crate::domain::{Error, Result, RuntimeId};
use crate::store::{NewApiKey, RuntimeCredential};

const CREATE: &str = "
INSERT INTO api_keys (id, name, scopes, secret_digest, created_at, expires_at)
VALUES ($1, $2, $3, $4, now(), now() + $5)
RETURNING *";

const LIST: &str = "SELECT * FROM api_keys ORDER BY created_at, id";

const REVOKE: &str = "
UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) WHERE id = $1 RETURNING *";

const FIND: &str = "SELECT * FROM api_keys WHERE id = $1";

const NOTE_USED: &str = "UPDATE api_keys SET last_used_at = now() WHERE id = $1";

const RUNTIME_CREDENTIAL: &str =
    "SELECT token_digest, revoked_token_digests FROM runtimes WHERE id = $1";

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: Uuid,
    name: String,
    scopes: Vec<String>,
    secret_digest: Vec<u8>,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl ApiKeyRow {
    fn into_key(self) -> Result<(ApiKey, SecretDigest)> {
        let grants = self
            .scopes
            .iter()
            .map(|scope| scope.parse::<Grant>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|error| Error::Internal(format!("a stored scope: {error}").into()))?;
        let digest = SecretDigest::from_bytes(&self.secret_digest)
            .ok_or_else(|| Error::Internal("a stored digest is not 32 bytes".into()))?;
        let key = ApiKey {
            id: self.id,
            name: self.name,
            grants,
            created_at: self.created_at,
            expires_at: self.expires_at,
            last_used_at: self.last_used_at,
            revoked_at: self.revoked_at,
        };
        Ok((key, digest))
    }
}

pub(super) async fn create(db: &Db, key: NewApiKey) -> Result<ApiKey> {
    let scopes: Vec<String> = key.grants.iter().map(ToString::to_string).collect();
    let row: ApiKeyRow = run!(
        db,
        sqlx::query_as(CREATE)
            .bind(key.id)
            .bind(&key.name)
            .bind(scopes)
            .bind(key.digest.as_bytes().as_slice())
            .bind(key.expires_in.map(interval)),
        fetch_one
    )
    .await
    .map_err(plain)?;
    Ok(row.into_key()?.0)
}

pub(super) async fn list(db: &Db) -> Result<Vec<ApiKey>> {
    let rows: Vec<ApiKeyRow> = run!(db, sqlx::query_as(LIST), fetch_all)
        .await
        .map_err(plain)?;
    rows.into_iter()
        .map(|row| row.into_key().map(|(key, _)| key))
        .collect()
}

pub(super) async fn revoke(db: &Db, key_id: Uuid) -> Result<ApiKey> {
    let row: Option<ApiKeyRow> = run!(db, sqlx::query_as(REVOKE).bind(key_id), fetch_optional)
        .await
        .map_err(plain)?;
    Ok(row.ok_or(Error::ApiKeyNotFound(key_id))?.into_key()?.0)
}

pub(super) async fn find(db: &Db, key_id: Uuid) -> Result<Option<(ApiKey, SecretDigest)>> {
    let row: Option<ApiKeyRow> = run!(db, sqlx::query_as(FIND).bind(key_id), fetch_optional)
        .await
        .map_err(plain)?;
    row.map(ApiKeyRow::into_key).transpose()
}

pub(super) async fn note_used(db: &Db, key_id: Uuid) -> Result<()> {
    run!(db, sqlx::query(NOTE_USED).bind(key_id), execute)
        .await
        .map_err(plain)?;
    Ok(())
}

pub(super) async fn runtime(db: &Db, runtime_id: RuntimeId) -> Result<Option<RuntimeCredential>> {
    /// The current digest, and the revoked ones.
    type CredentialRow = (Option<Vec<u8>>, Vec<Vec<u8>>);
    let row: Option<CredentialRow> = run!(
        db,
        sqlx::query_as(RUNTIME_CREDENTIAL).bind(runtime_id.as_uuid()),
        fetch_optional
    )
    .await
    .map_err(plain)?;
    Ok(row.map(|(current, revoked)| RuntimeCredential {
        current: current.as_deref().and_then(SecretDigest::from_bytes),
        revoked: revoked
            .iter()
            .filter_map(|digest| SecretDigest::from_bytes(digest))
            .collect(),
    }))
}
