//! The schema's life: migrations embedded in the binary, applied at start-up or by
//! `leasehold migrate`, and the start-up check that this binary can run against the schema it
//! finds (spec §11).
//!
//! Rollbacks: a schema newer than this binary is accepted as long as its
//! `schema_compatibility` row says binaries this old still work. Migrations follow the rule in
//! docs/operations.md (expand → migrate → contract): only a contract step, which lands after
//! every binary that needed the old shape is gone, raises `oldest_compatible`.

use std::collections::BTreeSet;

use anyhow::{Context as _, bail};
use sqlx::Connection as _;
use sqlx::PgConnection;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;

/// The migrations this binary knows. Versions the database holds beyond them (applied by a
/// newer binary) do not stop it; [`check_compatible`] decides whether it may run.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// The newest migration this binary knows.
pub fn newest_known_version() -> i64 {
    migrator()
        .iter()
        .map(|migration| migration.version)
        .max()
        .unwrap_or(0)
}

/// Applies pending migrations on a connection of its own, without the pool's statement and
/// lock timeouts (an index build may rightly take longer than any request). The migrator
/// takes an advisory lock, so replicas may start together.
pub async fn apply(options: &PgConnectOptions) -> anyhow::Result<()> {
    let options = options
        .clone()
        .options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut connection = PgConnection::connect_with(&options)
        .await
        .context("cannot connect to PostgreSQL")?;
    migrator()
        .run(&mut connection)
        .await
        .context("cannot apply migrations")?;
    check_compatible(&mut connection).await
}

/// Refuses to serve on a schema this binary cannot use: one missing migrations it needs
/// (`--migrate skip` before `leasehold migrate` ran), or one whose contract step dropped
/// something this binary still uses.
pub async fn check_compatible(connection: &mut PgConnection) -> anyhow::Result<()> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut *connection)
            .await
            .context("cannot read the applied migrations (run `leasehold migrate` first)")?;
    let applied: BTreeSet<i64> = applied.into_iter().collect();
    let missing: Vec<i64> = migrator()
        .iter()
        .map(|migration| migration.version)
        .filter(|version| !applied.contains(version))
        .collect();
    if !missing.is_empty() {
        bail!(
            "the database lacks migrations this binary needs ({missing:?}); run \
             `leasehold migrate` (or serve with --migrate auto)"
        );
    }
    let oldest_compatible: i64 =
        sqlx::query_scalar("SELECT oldest_compatible FROM schema_compatibility")
            .fetch_one(&mut *connection)
            .await
            .context("cannot read schema_compatibility")?;
    let newest_known = newest_known_version();
    if newest_known < oldest_compatible {
        bail!(
            "the database schema needs a binary that knows migration {oldest_compatible} or \
             later; this one stops at {newest_known} (roll forward, or restore the schema)"
        );
    }
    Ok(())
}
