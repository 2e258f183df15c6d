//! Runtimes: registration, liveness records, pages, capacity, deregistration.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::errors::plain;
use super::pooler::{Db, run};
use super::rows::{self, HorizonRow, MoveRow, RuntimeRow, to_u32};
use super::sql;
use crate::domain::auth::SecretDigest;
use crate::domain::{Error, Result, Runtime, RuntimeId, RuntimeStatus};
use crate::store::{
    Capacity, ClaimHorizon, HeartbeatAck, NewRuntime, REMEMBERED_REVOKED_TOKENS, TaskMove,
};

/// Fails with `RuntimeNotFound` unless the runtime exists.
pub(super) async fn require(db: &Db, runtime_id: RuntimeId) -> Result<()> {
    let exists: bool = run!(
        db,
        sqlx::query_scalar(sql::RUNTIME_EXISTS).bind(runtime_id.as_uuid()),
        fetch_one
    )
    .await
    .map_err(plain)?;
    if exists {
        Ok(())
    } else {
        Err(Error::RuntimeNotFound(runtime_id))
    }
}

/// RegisterRuntime: a new runtime with the digest of its token.
pub(super) async fn register(
    db: &Db,
    runtime: NewRuntime,
    token_digest: SecretDigest,
) -> Result<Runtime> {
    let row: RuntimeRow = run!(
        db,
        sqlx::query_as(sql::REGISTER_RUNTIME)
            .bind(RuntimeId::new_random().as_uuid())
            .bind(&runtime.name)
            .bind(&runtime.queues)
            .bind(Json(&runtime.labels))
            .bind(i64::from(runtime.max_concurrency))
            .bind(token_digest.as_bytes().as_slice())
            .bind(i32::try_from(REMEMBERED_REVOKED_TOKENS).unwrap_or(i32::MAX)),
        fetch_one
    )
    .await
    .map_err(plain)?;
    row.try_into()
}

/// A heartbeat: `last_seen_at` now, and the status the runtime is told.
pub(super) async fn heartbeat(db: &Db, runtime_id: RuntimeId) -> Result<HeartbeatAck> {
    let row: Option<(DateTime<Utc>, String)> = run!(
        db,
        sqlx::query_as(sql::HEARTBEAT).bind(runtime_id.as_uuid()),
        fetch_optional
    )
    .await
    .map_err(plain)?;
    let (server_time, status) = row.ok_or(Error::RuntimeNotFound(runtime_id))?;
    let status = RuntimeStatus::parse(&status)
        .ok_or_else(|| Error::Internal(format!("unexpected runtime status {status}").into()))?;
    Ok(HeartbeatAck {
        server_time,
        status,
    })
}

/// Signs of life of other calls (batched): the runtimes found ONLINE and touched.
pub(super) async fn touch(db: &Db, runtimes: &[RuntimeId]) -> Result<Vec<RuntimeId>> {
    let ids: Vec<Uuid> = runtimes.iter().map(|id| id.as_uuid()).collect();
    let touched: Vec<Uuid> = run!(
        db,
        sqlx::query_scalar(sql::TOUCH_RUNTIMES).bind(ids),
        fetch_all
    )
    .await
    .map_err(plain)?;
    Ok(touched.into_iter().map(RuntimeId::from_uuid).collect())
}

/// A page of runtimes, by id after `after`.
pub(super) async fn list(
    db: &Db,
    status: Option<RuntimeStatus>,
    after: Option<String>,
    limit: u32,
) -> Result<Vec<Runtime>> {
    let rows: Vec<RuntimeRow> = run!(
        db,
        sqlx::query_as(sql::LIST_RUNTIMES)
            .bind(status.map(RuntimeStatus::as_str))
            .bind(after)
            .bind(i64::from(limit)),
        fetch_all
    )
    .await
    .map_err(plain)?;
    rows.into_iter().map(Runtime::try_from).collect()
}

/// What a runtime may hold and holds.
pub(super) async fn capacity(db: &Db, runtime_id: RuntimeId) -> Result<Capacity> {
    let row: Option<(i64, i64)> = run!(
        db,
        sqlx::query_as(sql::RUNTIME_CAPACITY).bind(runtime_id.as_uuid()),
        fetch_optional
    )
    .await
    .map_err(plain)?;
    let (max_concurrency, held) = row.ok_or(Error::RuntimeNotFound(runtime_id))?;
    Ok(Capacity {
        max_concurrency: to_u32("max_concurrency", max_concurrency)?,
        held: to_u32("held", held)?,
    })
}

/// What a runtime's stream needs to know before its next claim.
pub(super) async fn horizon(db: &Db, runtime_id: RuntimeId) -> Result<ClaimHorizon> {
    let row: Option<HorizonRow> = run!(
        db,
        sqlx::query_as(sql::CLAIM_HORIZON).bind(runtime_id.as_uuid()),
        fetch_optional
    )
    .await
    .map_err(plain)?;
    row.map(ClaimHorizon::from)
        .ok_or(Error::RuntimeNotFound(runtime_id))
}

/// DeregisterRuntime's transaction: the runtime OFFLINE, its unstarted claims requeued (T4'').
pub(super) async fn deregister(db: &Db, runtime_id: RuntimeId) -> Result<Vec<TaskMove>> {
    let mut tx = db.begin().await.map_err(plain)?;
    let found: Option<Uuid> = sqlx::query_scalar(sql::DEREGISTER_RUNTIME)
        .persistent(db.prepares())
        .bind(runtime_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(plain)?;
    if found.is_none() {
        return Err(Error::RuntimeNotFound(runtime_id));
    }
    let rows: Vec<MoveRow> = sqlx::query_as(sql::REQUEUE_UNSTARTED)
        .persistent(db.prepares())
        .bind(runtime_id.as_uuid())
        .fetch_all(&mut *tx)
        .await
        .map_err(plain)?;
    tx.commit().await.map_err(plain)?;
    rows::moves(rows)
}
