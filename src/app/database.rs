//! PostgreSQL for the server: connection settings (timeouts, the pooler's needs), the pool,
//! migrations at start, and the store over it.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::Connection;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{Config, DatabasePooler, MigrateMode};
use crate::domain::RetryBackoff;
use crate::store::StorePolicy;
use crate::store::postgres::pooler::Route;
use crate::store::postgres::{PgStore, schema};

/// How long a request waits for a free database connection before it is UNAVAILABLE.
const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// A pooled PostgreSQL connection idle this long is pinged before it is used again.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The connection settings of every pooled connection: the URL's, plus a `statement_timeout`
/// and a `lock_timeout` (spec §10), so no statement or lock wait holds a connection for long.
/// Behind a transaction pooler the timeouts are set in every transaction instead (see
/// [`route`]), and no startup parameter a pooler might refuse is sent.
pub fn connect_options(database_url: &str, config: &Config) -> anyhow::Result<PgConnectOptions> {
    let millis = |duration: Duration| format!("{}ms", duration.as_millis());
    let options = PgConnectOptions::from_str(database_url).context("invalid DATABASE_URL")?;
    Ok(match config.database_pooler {
        DatabasePooler::None => options.options([
            (
                "statement_timeout",
                millis(config.database_statement_timeout),
            ),
            ("lock_timeout", millis(config.database_lock_timeout)),
        ]),
        DatabasePooler::Transaction => for_pooler(options),
    })
}

/// Without `extra_float_digits`, a startup parameter PgBouncer refuses unless told to ignore
/// it (leasehold reads floats in binary, so it does not need it).
pub fn for_pooler(options: PgConnectOptions) -> PgConnectOptions {
    options.extra_float_digits(None)
}

/// How the store's statements reach PostgreSQL.
pub fn route(config: &Config) -> Route {
    match config.database_pooler {
        DatabasePooler::None => Route::Direct,
        DatabasePooler::Transaction => Route::TransactionPooler {
            statement_timeout: config.database_statement_timeout,
            lock_timeout: config.database_lock_timeout,
        },
    }
}

/// The PostgreSQL store over `pool`, as `config` says.
pub fn postgres_store(pool: PgPool, config: &Config) -> PgStore {
    PgStore::routed(pool, store_policy(config), route(config))
}

pub(super) async fn connect_postgres(
    database_url: &str,
    config: &Config,
) -> anyhow::Result<PgStore> {
    let pool = PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
        // sqlx pings every connection it hands out by default: one more round trip per
        // statement. A connection in steady use needs no ping; one that sat idle gets one.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(connect_options(database_url, config)?)
        .await
        .context("cannot connect to PostgreSQL")?;
    match config.migrate {
        MigrateMode::Auto => schema::apply(&pool.connect_options(), route(config)).await?,
        MigrateMode::Skip => {
            let mut connection = pool.acquire().await?;
            schema::check_compatible(&mut connection).await?;
        }
    }
    Ok(postgres_store(pool, config))
}

pub fn store_policy(config: &Config) -> StorePolicy {
    StorePolicy {
        lease_duration: config.lease_duration,
        max_lease_expirations: config.max_lease_expirations,
        retry_backoff: RetryBackoff {
            base: config.retry_backoff_base,
            max: config.retry_backoff_max,
        },
    }
}
