//! How statements reach PostgreSQL: directly, or through a transaction-pooling PgBouncer
//! (docs/operations.md, "Behind PgBouncer").
//!
//! Directly, a connection keeps its session: sqlx prepares each statement once per connection
//! and reuses it, and the statement and lock timeouts are session settings sent at connect.
//!
//! A transaction pooler lends a server connection to this client only while a transaction is
//! open; at every other ReadyForQuery it may hand the server to someone else. sqlx runs a
//! statement with arguments in two round trips (Parse + Describe + Sync, then Bind + Execute +
//! Sync), and the second could land on a server that never saw the first. Behind a pooler,
//! each statement therefore runs unnamed (nothing is left behind on the server) in a
//! transaction of its own, opened together with the timeouts as `SET LOCAL`: BEGIN, the
//! statement, COMMIT. Two round trips more per statement are the price of the pooler.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool, Postgres, Transaction};

/// How statements reach PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Route {
    /// Straight to PostgreSQL (or through a session-mode pooler): sessions last.
    #[default]
    Direct,
    /// Through a transaction-mode pooler: nothing outlives a transaction, so the timeouts
    /// are set in each one.
    TransactionPooler {
        statement_timeout: Duration,
        lock_timeout: Duration,
    },
}

impl Route {
    /// The statement that opens a transaction on this route: behind a pooler it carries the
    /// session settings the pooler cannot keep.
    fn begin(self) -> Option<Arc<str>> {
        match self {
            Route::Direct => None,
            Route::TransactionPooler {
                statement_timeout,
                lock_timeout,
            } => Some(
                format!(
                    "BEGIN; SET LOCAL statement_timeout = '{}ms'; SET LOCAL lock_timeout = '{}ms'",
                    statement_timeout.as_millis(),
                    lock_timeout.as_millis()
                )
                .into(),
            ),
        }
    }
}

/// Runs one statement on a connection of `db`'s pool, the way its route needs:
/// `run!(&self.db, sqlx::query_as(sql::GET_TASK).bind(id), fetch_optional).await` answers what
/// `.fetch_optional(pool).await` would. (A macro rather than a method taking an async closure:
/// the futures of async closures over borrowed statements are not provably `Send` today.)
macro_rules! run {
    ($db:expr, $statement:expr, $method:ident) => {{
        let db: &$crate::store::postgres::pooler::Db = $db;
        let statement = $statement;
        async move {
            let mut connection = db.pool().acquire().await?;
            $crate::store::postgres::pooler::run_on!(db, &mut connection, statement, $method).await
        }
    }};
}
pub(super) use run;

/// [`run!`] on a pooled connection the caller holds.
macro_rules! run_on {
    ($db:expr, $connection:expr, $statement:expr, $method:ident) => {{
        let db: &$crate::store::postgres::pooler::Db = $db;
        let connection: &mut sqlx::pool::PoolConnection<sqlx::Postgres> = $connection;
        let statement = $statement;
        async move {
            match db.opens_transactions() {
                None => statement.$method(&mut **connection).await,
                Some(begin) => {
                    let mut transaction =
                        $crate::store::postgres::pooler::OwnTransaction::begin(connection, begin)
                            .await?;
                    let outcome = statement
                        .persistent(false)
                        .$method(transaction.connection())
                        .await;
                    transaction.end(outcome).await
                }
            }
        }
    }};
}
pub(super) use run_on;

/// A pool and the route its statements take.
#[derive(Clone)]
pub(super) struct Db {
    pool: PgPool,
    /// Behind a transaction pooler: what opens each transaction.
    begin: Option<Arc<str>>,
}

impl Db {
    pub(super) fn new(pool: PgPool, route: Route) -> Self {
        Self {
            pool,
            begin: route.begin(),
        }
    }

    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same route over another pool.
    pub(super) fn with_pool(&self, pool: PgPool) -> Self {
        Self {
            pool,
            begin: self.begin.clone(),
        }
    }

    /// Whether statements may stay prepared on their connection (not behind a pooler).
    pub(super) fn prepares(&self) -> bool {
        self.begin.is_none()
    }

    /// Behind a pooler: the statement that opens each statement's own transaction.
    pub(super) fn opens_transactions(&self) -> Option<&Arc<str>> {
        self.begin.as_ref()
    }

    /// An explicit transaction of several statements; each of them must be run with
    /// `.persistent(db.prepares())`.
    pub(super) async fn begin(&self) -> sqlx::Result<Transaction<'static, Postgres>> {
        match &self.begin {
            None => self.pool.begin().await,
            Some(begin) => self.pool.begin_with(sql_text(begin)).await,
        }
    }

    /// [`Db::begin`] on a connection the caller holds.
    pub(super) async fn begin_on<'c>(
        &self,
        connection: &'c mut PgConnection,
    ) -> sqlx::Result<Transaction<'c, Postgres>> {
        match &self.begin {
            None => connection.begin().await,
            Some(begin) => connection.begin_with(sql_text(begin)).await,
        }
    }
}

fn sql_text(text: &Arc<str>) -> AssertSqlSafe<Arc<str>> {
    // Built by `Route::begin` from durations alone.
    AssertSqlSafe(text.clone())
}

/// The transaction around one statement behind a pooler. Dropped while open (its future was
/// cancelled mid-way), it closes the connection rather than let the pool lend out a
/// connection inside a transaction.
pub(super) struct OwnTransaction<'c> {
    connection: &'c mut PoolConnection<Postgres>,
    open: bool,
}

impl<'c> OwnTransaction<'c> {
    pub(super) async fn begin(
        connection: &'c mut PoolConnection<Postgres>,
        begin: &Arc<str>,
    ) -> sqlx::Result<Self> {
        let transaction = Self {
            connection,
            open: true,
        };
        sqlx::raw_sql(sql_text(begin))
            .execute(&mut **transaction.connection)
            .await?;
        Ok(transaction)
    }

    pub(super) fn connection(&mut self) -> &mut PgConnection {
        self.connection
    }

    /// COMMIT after a statement that succeeded, ROLLBACK after one that failed (whose own
    /// error says more than the ROLLBACK's).
    pub(super) async fn end<T>(mut self, outcome: sqlx::Result<T>) -> sqlx::Result<T> {
        let end = if outcome.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = sqlx::raw_sql(end).execute(&mut **self.connection).await;
        let value = outcome?;
        ended?;
        self.open = false;
        Ok(value)
    }
}

impl Drop for OwnTransaction<'_> {
    fn drop(&mut self) {
        if self.open {
            self.connection.close_on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_transaction_sets_the_timeouts_a_session_cannot_keep() {
        let route = Route::TransactionPooler {
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_millis(5_500),
        };
        assert_eq!(
            route.begin().as_deref(),
            Some(
                "BEGIN; SET LOCAL statement_timeout = '30000ms'; \
                 SET LOCAL lock_timeout = '5500ms'"
            )
        );
        assert_eq!(Route::Direct.begin(), None);
    }
}
