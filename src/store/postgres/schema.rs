//! The schema's life: migrations embedded in the binary, applied at start-up or by
//! `leasehold migrate`, and the start-up check that this binary can run against the schema it
//! finds (spec §11).
//!
//! Rollbacks: a schema newer than this binary is accepted as long as its
//! `schema_compatibility` row says binaries this old still work. Migrations follow the rule in
//! docs/operations.md (expand → migrate → contract): only a contract step, which lands after
//! every binary that needed the old shape is gone, raises `oldest_compatible`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, Row as _};

use super::pooler::Route;

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

/// Applies pending migrations on a connection of its own, then checks this binary can serve
/// on the result. Replicas may start together: one applies, the others wait for it.
pub async fn apply(options: &PgConnectOptions, route: Route) -> anyhow::Result<()> {
    match route {
        Route::Direct => apply_directly(options).await,
        Route::TransactionPooler { .. } => apply_through_pooler(options).await,
    }
}

/// sqlx's migrator, without the pool's statement and lock timeouts (an index build may
/// rightly take longer than any request), under its session advisory lock.
async fn apply_directly(options: &PgConnectOptions) -> anyhow::Result<()> {
    let options = options
        .clone()
        .options([("statement_timeout", "0"), ("lock_timeout", "0")]);
    let mut connection = connect(&options).await?;
    migrator()
        .run(&mut connection)
        .await
        .context("cannot apply migrations")?;
    check_compatible(&mut connection).await
}

async fn connect(options: &PgConnectOptions) -> anyhow::Result<PgConnection> {
    PgConnection::connect_with(options)
        .await
        .context("cannot connect to PostgreSQL")
}

/// Through a transaction pooler, neither sqlx's session lock nor its prepared bookkeeping
/// statements would survive between transactions. Here every statement is a simple query,
/// and replicas are serialized by a transaction-level advisory lock that a second connection
/// holds for the whole run (the pooler keeps a server for a client inside a transaction; if
/// this process dies, its transaction and the lock end with it). The bookkeeping is sqlx's own
/// `_sqlx_migrations` table, so either way of migrating reads what the other wrote.
async fn apply_through_pooler(options: &PgConnectOptions) -> anyhow::Result<()> {
    let mut lock = connect(options).await?;
    let mut connection = connect(options).await?;
    hold_migration_lock(&mut lock).await?;
    let applied = apply_pending(&mut connection).await;
    // Ends the lock's transaction; a failure here closes the connection, which ends it too.
    let _ = sqlx::raw_sql("COMMIT").execute(&mut lock).await;
    applied?;
    check_compatible(&mut connection).await
}

/// The advisory lock key of pooled migrations ('lhmigrat' in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x6c68_6d69_6772_6174;

/// Longest wait for another replica's migrations.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(30 * 60);

/// Opens a transaction on `lock` holding the migration lock. Waiters poll rather than block,
/// so a waiting replica holds no server connection of the pooler between tries.
async fn hold_migration_lock(lock: &mut PgConnection) -> anyhow::Result<()> {
    let deadline = Instant::now() + MIGRATION_LOCK_WAIT;
    let try_lock = format!("SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})");
    loop {
        sqlx::raw_sql("BEGIN").execute(&mut *lock).await?;
        let row = sqlx::raw_sql(AssertSqlSafe(try_lock.clone()))
            .fetch_one(&mut *lock)
            .await?;
        if row.try_get::<bool, _>(0)? {
            return Ok(());
        }
        sqlx::raw_sql("ROLLBACK").execute(&mut *lock).await?;
        if Instant::now() > deadline {
            bail!("another replica held the migration lock for {MIGRATION_LOCK_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Applies, in order, every migration this binary knows that the database lacks.
async fn apply_pending(connection: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMPTZ NOT NULL DEFAULT now(),
            success BOOLEAN NOT NULL,
            checksum BYTEA NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .execute(&mut *connection)
    .await?;
    let applied = applied_checksums(connection).await?;
    for migration in migrator().iter() {
        if migration.migration_type.is_down_migration() {
            continue;
        }
        match applied.get(&migration.version) {
            Some(checksum) if checksum[..] == migration.checksum[..] => {}
            Some(_) => bail!(
                "migration {} was applied with different contents than this binary holds",
                migration.version
            ),
            None => apply_one(connection, migration)
                .await
                .with_context(|| format!("cannot apply migration {}", migration.version))?,
        }
    }
    Ok(())
}

/// The checksums of the applied migrations; refuses a database where one failed half-way.
async fn applied_checksums(
    connection: &mut PgConnection,
) -> anyhow::Result<BTreeMap<i64, Vec<u8>>> {
    let rows = sqlx::raw_sql("SELECT version, success, checksum FROM _sqlx_migrations")
        .fetch_all(&mut *connection)
        .await?;
    let mut applied = BTreeMap::new();
    for row in rows {
        let version: i64 = row.try_get(0)?;
        if !row.try_get::<bool, _>(1)? {
            bail!("migration {version} was partially applied; repair the database by hand");
        }
        applied.insert(version, row.try_get(2)?);
    }
    Ok(applied)
}

/// One migration and its bookkeeping row, in one transaction unless the migration says it
/// cannot run in one (`CREATE INDEX CONCURRENTLY`).
async fn apply_one(connection: &mut PgConnection, migration: &Migration) -> anyhow::Result<()> {
    let started = Instant::now();
    let in_transaction = !migration.no_tx;
    if in_transaction {
        sqlx::raw_sql("BEGIN").execute(&mut *connection).await?;
    }
    let applied = async {
        sqlx::raw_sql(migration.sql.clone())
            .execute(&mut *connection)
            .await?;
        sqlx::raw_sql(AssertSqlSafe(record_statement(
            migration,
            started.elapsed(),
        )))
        .execute(&mut *connection)
        .await
    }
    .await;
    if in_transaction {
        let end = if applied.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = sqlx::raw_sql(end).execute(&mut *connection).await;
        applied?;
        ended?;
    } else {
        applied?;
    }
    Ok(())
}

/// The `_sqlx_migrations` row of an applied migration, as a literal statement (no prepared
/// statement survives a transaction pooler).
fn record_statement(migration: &Migration, took: Duration) -> String {
    let checksum: String = migration
        .checksum
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ({}, '{}', TRUE, decode('{checksum}', 'hex'), {})",
        migration.version,
        migration.description.replace('\'', "''"),
        i64::try_from(took.as_nanos()).unwrap_or(i64::MAX)
    )
}

/// Refuses to serve on a schema this binary cannot use: one missing migrations it needs
/// (`--migrate skip` before `leasehold migrate` ran), or one whose contract step dropped
/// something this binary still uses.
pub async fn check_compatible(connection: &mut PgConnection) -> anyhow::Result<()> {
    // Simple statements (no prepared statement), which also pass a transaction pooler.
    let applied: BTreeSet<i64> =
        sqlx::raw_sql("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut *connection)
            .await
            .context("cannot read the applied migrations (run `leasehold migrate` first)")?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()?;
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
        sqlx::raw_sql("SELECT oldest_compatible FROM schema_compatibility")
            .fetch_one(&mut *connection)
            .await
            .context("cannot read schema_compatibility")?
            .try_get(0)?;
    let newest_known = newest_known_version();
    if newest_known < oldest_compatible {
        bail!(
            "the database schema needs a binary that knows migration {oldest_compatible} or \
             later; this one stops at {newest_known} (roll forward, or restore the schema)"
        );
    }
    Ok(())
}
