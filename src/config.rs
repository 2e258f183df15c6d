//! Command-line and environment configuration (spec §8). Every flag has an environment
//! variable; durations are humantime strings (`250ms`, `2s`, `5m`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

use crate::auth::AuthMode;
use crate::telemetry::LogFormat;

/// What stands between leasehold and PostgreSQL (docs/operations.md, "Behind PgBouncer").
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatabasePooler {
    /// Nothing, or a session-mode pooler: a connection keeps its session.
    None,
    /// A transaction-mode pooler (PgBouncer `pool_mode = transaction`): nothing outlives a
    /// transaction, so every statement runs unnamed in a transaction of its own.
    Transaction,
}

/// Which store holds tasks and runtimes (spec §11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// PostgreSQL at `--database-url`.
    Postgres,
    /// The embedded in-memory store: everything is lost when the process stops.
    Memory,
}

/// Whether `serve` applies pending migrations at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MigrateMode {
    /// Apply pending migrations before serving (replicas may start together).
    Auto,
    /// Apply nothing: `leasehold migrate` runs as its own step. The schema must already hold
    /// every migration this binary knows.
    Skip,
}

fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "LEASEHOLD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// `token`: every call needs a credential (an API key, a runtime token or the admin
    /// token); `none`: no checks, for development on loopback.
    #[arg(long, env = "LEASEHOLD_AUTH", value_enum, default_value_t = AuthMode::Token)]
    pub auth: AuthMode,

    /// File holding the admin token (every scope); re-read when it changes.
    #[arg(long, env = "LEASEHOLD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Calls in progress on this replica beyond which a call is refused at once with
    /// RESOURCE_EXHAUSTED / OVERLOADED (load shedding, not queueing).
    #[arg(long, env = "LEASEHOLD_MAX_INFLIGHT_CALLS", default_value_t = 2048)]
    pub max_inflight_calls: usize,

    /// Claim streams one runtime may hold open on this replica; more → TOO_MANY_STREAMS.
    #[arg(long, env = "LEASEHOLD_MAX_STREAMS_PER_RUNTIME", default_value_t = 4)]
    pub max_streams_per_runtime: usize,

    /// PEM certificate chain of the gRPC listener; with --tls-key the listener is TLS-only.
    /// Re-read when the file changes (rotation needs no restart).
    #[arg(long, env = "LEASEHOLD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "LEASEHOLD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA: with it, every client must present a certificate this CA signed (mutual TLS).
    #[arg(long, env = "LEASEHOLD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Address of a plaintext listener serving `grpc.health.v1` only, for kubelet probes
    /// (which speak neither TLS nor tokens); unset = off.
    #[arg(long, env = "LEASEHOLD_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// `postgres` (needs --database-url) or `memory`. Unset: PostgreSQL when a database URL
    /// is given, else the in-memory store, which `serve` refuses when listening beyond
    /// loopback (a deployment missing its DATABASE_URL fails loudly instead of losing data).
    #[arg(long, env = "LEASEHOLD_STORE", value_enum)]
    pub store: Option<StoreKind>,

    /// `auto`: apply pending migrations at start-up; `skip`: leave them to `leasehold migrate`.
    #[arg(long, env = "LEASEHOLD_MIGRATE", value_enum, default_value_t = MigrateMode::Auto)]
    pub migrate: MigrateMode,

    /// Largest number of PostgreSQL connections the server holds.
    #[arg(long, env = "LEASEHOLD_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    pub database_max_connections: u32,

    /// PostgreSQL `statement_timeout` of every connection (migrations excepted): no statement
    /// holds a connection longer.
    #[arg(long, env = "LEASEHOLD_DATABASE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub database_statement_timeout: Duration,

    /// PostgreSQL `lock_timeout` of every connection: no statement waits longer for a lock.
    #[arg(long, env = "LEASEHOLD_DATABASE_LOCK_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub database_lock_timeout: Duration,

    /// `transaction` when `--database-url` points at a transaction-mode pooler (PgBouncer).
    #[arg(long, env = "LEASEHOLD_DATABASE_POOLER", value_enum, default_value_t = DatabasePooler::None)]
    pub database_pooler: DatabasePooler,

    /// Redis connection URL (liveness, empty-queue cache, cross-replica wake-ups).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Timeout of each Redis call; a call that takes longer marks Redis degraded.
    #[arg(long, env = "LEASEHOLD_REDIS_TIMEOUT", default_value = "250ms", value_parser = duration)]
    pub redis_timeout: Duration,

    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "LEASEHOLD_REDIS_KEY_PREFIX", default_value = "leasehold")]
    pub redis_key_prefix: String,

    /// How long a claim stays valid before StartTask must be called.
    #[arg(long, env = "LEASEHOLD_LEASE_DURATION", default_value = "60s", value_parser = duration)]
    pub lease_duration: Duration,

    /// Heartbeat interval suggested to runtimes when they register.
    #[arg(long, env = "LEASEHOLD_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// A runtime without a heartbeat for this long is marked OFFLINE.
    #[arg(long, env = "LEASEHOLD_OFFLINE_AFTER", default_value = "150s", value_parser = duration)]
    pub offline_after: Duration,

    /// TTL of a runtime's liveness key in Redis.
    #[arg(long, env = "LEASEHOLD_LIVENESS_TTL", default_value = "90s", value_parser = duration)]
    pub liveness_ttl: Duration,

    /// How often the sweeper runs its stages.
    #[arg(long, env = "LEASEHOLD_SWEEP_INTERVAL", default_value = "30s", value_parser = duration)]
    pub sweep_interval: Duration,

    /// Rows one sweeper statement changes at most; a stage repeats until a batch is short.
    #[arg(long, env = "LEASEHOLD_SWEEP_BATCH_SIZE", default_value_t = 500)]
    pub sweep_batch_size: u32,

    /// A DISPATCHED task older than this is failed as DISPATCH_TIMEOUT.
    #[arg(long, env = "LEASEHOLD_DISPATCH_TIMEOUT", default_value = "300s", value_parser = duration)]
    pub dispatch_timeout: Duration,

    /// A task whose lease expires more often than this fails as LEASE_EXPIRED_TOO_OFTEN.
    #[arg(long, env = "LEASEHOLD_MAX_LEASE_EXPIRATIONS", default_value_t = 5)]
    pub max_lease_expirations: u32,

    /// Finished tasks (COMPLETED, FAILED, CANCELLED) are deleted this long after they
    /// finished, with their usage rows; 0 keeps them forever.
    #[arg(long, env = "LEASEHOLD_RETAIN_FINISHED", default_value = "7d", value_parser = duration)]
    pub retain_finished: Duration,

    /// A QUEUED task pinned to a runtime OFFLINE for longer than this fails as RUNTIME_GONE.
    #[arg(long, env = "LEASEHOLD_PINNED_ORPHAN_GRACE", default_value = "1h", value_parser = duration)]
    pub pinned_orphan_grace: Duration,

    /// Base of the exponential retry backoff.
    #[arg(long, env = "LEASEHOLD_RETRY_BACKOFF_BASE", default_value = "1s", value_parser = duration)]
    pub retry_backoff_base: Duration,

    /// Cap of the exponential retry backoff.
    #[arg(long, env = "LEASEHOLD_RETRY_BACKOFF_MAX", default_value = "5m", value_parser = duration)]
    pub retry_backoff_max: Duration,

    /// Largest accepted task payload, in bytes.
    #[arg(long, env = "LEASEHOLD_MAX_PAYLOAD_BYTES", default_value_t = 1_048_576)]
    pub max_payload_bytes: usize,

    /// Interval of keepalive messages on claim streams.
    #[arg(long, env = "LEASEHOLD_STREAM_KEEPALIVE", default_value = "15s", value_parser = duration)]
    pub stream_keepalive: Duration,

    /// Fallback re-check interval of an idle claim stream.
    #[arg(long, env = "LEASEHOLD_STREAM_POLL_INTERVAL", default_value = "5s", value_parser = duration)]
    pub stream_poll_interval: Duration,

    /// While a stream's claims keep finding work, a credit returned with fewer than half of
    /// the stream's credits free waits up to this long for more, so that several tasks are
    /// claimed in one statement (like a fetch's minimum size and maximum wait). 0 = claim on
    /// every grant.
    #[arg(long, env = "LEASEHOLD_STREAM_CLAIM_LINGER", default_value = "20ms", value_parser = duration)]
    pub stream_claim_linger: Duration,

    /// How long shutdown waits for in-flight calls.
    #[arg(long, env = "LEASEHOLD_SHUTDOWN_GRACE", default_value = "30s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Address of the Prometheus metrics endpoint; unset = off.
    #[arg(long, env = "LEASEHOLD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Address of the operator console (plain HTTP, with `/metrics` too); unset = off.
    #[arg(long, env = "LEASEHOLD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// How long a console sign-in lasts.
    #[arg(long, env = "LEASEHOLD_CONSOLE_SESSION_TTL", default_value = "8h", value_parser = duration)]
    pub console_session_ttl: Duration,

    /// Mark the console's session cookie `Secure`: set it when browsers reach the console over
    /// HTTPS through a TLS-terminating proxy (a request forwarded as https gets it anyway).
    #[arg(long, env = "LEASEHOLD_CONSOLE_SECURE_COOKIES")]
    pub console_secure_cookies: bool,

    /// Log format: human-readable or one JSON object per line.
    #[arg(long, env = "LEASEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
}

/// `leasehold serve`'s flags alone (the whole command line is `crate::cli::Cli`).
#[derive(Debug, Parser)]
struct ServeFlags {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// The store this configuration asks for, or why it is refused: a missing database URL
    /// outside loopback is a deployment mistake, not a request for the in-memory store.
    pub fn store_kind(&self) -> Result<StoreKind, String> {
        choose_store(self.store, self.database_url.is_some(), self.listen)
    }

    /// The defaults, as `leasehold serve` with no flags and no environment would see them.
    pub fn defaults() -> Self {
        ServeFlags::parse_from(["leasehold"]).config
    }
}

/// See [`Config::store_kind`].
fn choose_store(
    asked: Option<StoreKind>,
    has_database_url: bool,
    listen: SocketAddr,
) -> Result<StoreKind, String> {
    match (asked, has_database_url) {
        (Some(StoreKind::Postgres), false) => {
            Err("--store postgres needs --database-url (DATABASE_URL)".into())
        }
        (Some(StoreKind::Memory), true) => {
            Err("--store memory was given together with a database URL; drop one of them".into())
        }
        (Some(kind), _) => Ok(kind),
        (None, true) => Ok(StoreKind::Postgres),
        (None, false) if listen.ip().is_loopback() => Ok(StoreKind::Memory),
        (None, false) => Err(format!(
            "no DATABASE_URL: refusing to serve {} on the in-memory store, which loses \
                 every task when the process stops; set DATABASE_URL (or --database-url), \
                 or pass --store memory if a throwaway store is really meant",
            listen
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_humantime_strings() {
        let cli = ServeFlags::try_parse_from([
            "leasehold",
            "--lease-duration",
            "250ms",
            "--retry-backoff-max",
            "5m",
        ])
        .unwrap();
        let config = cli.config;
        assert_eq!(config.lease_duration, Duration::from_millis(250));
        assert_eq!(config.retry_backoff_max, Duration::from_secs(300));
    }

    #[test]
    fn the_store_follows_the_database_url_and_refuses_memory_beyond_loopback() {
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let everywhere: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let memory = Some(StoreKind::Memory);
        let postgres = Some(StoreKind::Postgres);
        assert_eq!(choose_store(None, false, loopback), Ok(StoreKind::Memory));
        let refusal = choose_store(None, false, everywhere).unwrap_err();
        assert!(refusal.contains("DATABASE_URL"), "{refusal}");
        assert_eq!(
            choose_store(memory, false, everywhere),
            Ok(StoreKind::Memory)
        );
        assert_eq!(
            choose_store(None, true, everywhere),
            Ok(StoreKind::Postgres)
        );
        assert_eq!(
            choose_store(postgres, true, loopback),
            Ok(StoreKind::Postgres)
        );
        assert!(choose_store(postgres, false, loopback).is_err());
        assert!(choose_store(memory, true, loopback).is_err());
    }

    #[test]
    fn a_malformed_duration_is_rejected() {
        let parsed = ServeFlags::try_parse_from(["leasehold", "--lease-duration", "soon"]);
        assert!(parsed.is_err());
    }
}
