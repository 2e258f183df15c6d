//! Classifies sqlx errors into the service's categories, by SQLSTATE. The raw error is logged
//! here and kept as the source; it never reaches a client.

use crate::domain::{Error, RuntimeId};

/// leasehold_claim(): the runtime does not exist.
const RUNTIME_NOT_FOUND: &str = "LH001";
/// leasehold_claim(): the request's budget ran out before commit.
const CLAIM_DEADLINE_PASSED: &str = "LH002";
const FOREIGN_KEY_VIOLATION: &str = "23503";
const SERIALIZATION_FAILURE: &str = "40001";
const DEADLOCK_DETECTED: &str = "40P01";
/// A read-only transaction: the database is a standby (after a failover, until the pooler or
/// DNS points at the new primary).
const READ_ONLY_SQL_TRANSACTION: &str = "25006";

/// What a failed statement was about, so SQLSTATEs with a business meaning map precisely.
#[derive(Clone, Copy, Debug)]
pub(super) enum Context {
    Plain,
    /// A statement naming this runtime (claim, pinned enqueue).
    Runtime(RuntimeId),
}

pub(super) fn classify(error: sqlx::Error, context: Context) -> Error {
    if let Some(db_error) = error.as_database_error() {
        let code = db_error.code().unwrap_or_default();
        match (code.as_ref(), context) {
            (RUNTIME_NOT_FOUND | FOREIGN_KEY_VIOLATION, Context::Runtime(id)) => {
                return Error::RuntimeNotFound(id);
            }
            (CLAIM_DEADLINE_PASSED, _) => return Error::DeadlineExceeded,
            (code, _) if is_unavailable_sqlstate(code) => {
                tracing::warn!(%error, "database unavailable");
                return Error::StoreUnavailable(error.into());
            }
            (SERIALIZATION_FAILURE | DEADLOCK_DETECTED, _) => {
                tracing::info!(%error, "a statement conflicted with a concurrent one");
                return Error::StoreConflict(error.into());
            }
            _ => {}
        }
    }
    if is_unavailable(&error) {
        tracing::warn!(%error, "database unavailable");
        return Error::StoreUnavailable(error.into());
    }
    tracing::error!(%error, "database error");
    Error::Internal(error.into())
}

pub(super) fn plain(error: sqlx::Error) -> Error {
    classify(error, Context::Plain)
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Connection exceptions (08), admin/crash shutdown and "cannot connect now" (57P0x), too many
/// connections (53300), a read-only standby (25006): the database is there but not serving our
/// writes right now; the client retries.
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P0")
        || code == "53300"
        || code == READ_ONLY_SQL_TRANSACTION
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with only a SQLSTATE, as PostgreSQL would send it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(formatter, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "test"
        }

        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }

        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }

        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }

        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn classified(code: &'static str) -> Error {
        plain(sqlx::Error::Database(Box::new(Sqlstate(code))))
    }

    #[test]
    fn conflicts_and_unavailable_databases_are_told_apart_by_sqlstate() {
        assert!(matches!(classified("40001"), Error::StoreConflict(_)));
        assert!(matches!(classified("40P01"), Error::StoreConflict(_)));
        for unavailable in ["25006", "57P01", "57P03", "08006", "53300"] {
            assert!(
                matches!(classified(unavailable), Error::StoreUnavailable(_)),
                "{unavailable}"
            );
        }
        assert!(matches!(classified("42601"), Error::Internal(_)));
    }
}
