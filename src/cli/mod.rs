//! The `leasehold` binary's command line ([`Cli`]), and its client subcommands: the `worker`
//! daemon and the operator commands (`task`, `queue`, `runtime`, `key`), each talking to a
//! server over gRPC with the SDK. `serve`'s flags are [`crate::config::Config`].

mod keys;
mod operator;
mod render;
mod worker_daemon;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::Status;

use crate::client::{Client, TlsOptions, error_reason};

pub use keys::KeyCommand;
pub use operator::{QueueCommand, RuntimeCommand, TaskCommand};
pub use worker_daemon::WorkerArgs;

#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about = "gRPC lease-coordination service")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the leasehold server.
    Serve(Box<crate::config::Config>),
    /// Run a worker daemon that executes a command per task: `leasehold worker --queue Q -- CMD`.
    Worker(Box<WorkerArgs>),
    /// Enqueue, inspect, cancel and redrive tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Describe a queue, cap it, pause or resume it.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Inspect registered runtimes.
    #[command(subcommand)]
    Runtime(RuntimeCommand),
    /// Create, list and revoke API keys (needs the admin token or an `admin` key).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Measure throughput, latency and idle cost against servers it starts; prints JSON.
    Bench(Box<crate::bench::BenchArgs>),
    /// Fault-injection soak: load, many faults at once, then a checker over the whole history.
    Soak(Box<crate::soak::SoakArgs>),
    /// Apply the database migrations and exit (a deployment step, e.g. a Kubernetes Job).
    Migrate(MigrateArgs),
}

#[derive(Clone, Debug, Args)]
pub struct MigrateArgs {
    /// PostgreSQL connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// `transaction` when the URL points at a transaction-mode pooler (PgBouncer).
    #[arg(long, env = "LEASEHOLD_DATABASE_POOLER", value_enum, default_value_t = crate::config::DatabasePooler::None)]
    pub database_pooler: crate::config::DatabasePooler,
}

impl Cli {
    /// The server's configuration, when the command is `serve`.
    pub fn into_config(self) -> Option<crate::config::Config> {
        match self.command {
            Command::Serve(config) => Some(*config),
            _ => None,
        }
    }
}

/// Where the server is; every client subcommand takes it.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// The leasehold server's URL.
    #[arg(
        long,
        env = "LEASEHOLD_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// The bearer credential: an API key (`lhk_…`) or the admin token. For `leasehold
    /// worker`, an API key with the `register` scope; the daemon then uses its runtime token.
    #[arg(long, env = "LEASEHOLD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// A file holding the credential (a mounted Kubernetes Secret), when --token is not given.
    #[arg(long, env = "LEASEHOLD_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// PEM CA that signed the server's certificate: the connection uses TLS (an https URL).
    #[arg(long, env = "LEASEHOLD_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// PEM client certificate, for a server that requires mutual TLS (with --client-key).
    #[arg(long, env = "LEASEHOLD_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<std::path::PathBuf>,

    /// PEM private key of --client-cert.
    #[arg(long, env = "LEASEHOLD_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<std::path::PathBuf>,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let tls = self.tls()?;
        let client = Client::connect_with(self.server.clone(), tls.as_ref())
            .map_err(|error| anyhow::anyhow!("bad --server {:?}: {error}", self.server))?;
        let token = crate::client::token_from(self.token.as_deref(), self.token_file.as_deref())
            .map_err(|error| anyhow::anyhow!("cannot read --token-file: {error}"))?;
        match token {
            Some(token) => Ok(client.with_token(&token)?),
            None => Ok(client),
        }
    }
}

impl ServerArgs {
    /// TLS when a CA or a client certificate is given, or the URL is https.
    fn tls(&self) -> anyhow::Result<Option<TlsOptions>> {
        let identity = self.client_cert.as_deref().zip(self.client_key.as_deref());
        if self.ca_cert.is_none() && identity.is_none() && !self.server.starts_with("https:") {
            return Ok(None);
        }
        let tls = TlsOptions::from_files(self.ca_cert.as_deref(), identity)
            .map_err(|error| anyhow::anyhow!("cannot read a TLS file: {error}"))?;
        Ok(Some(tls))
    }
}

/// How an operator command prints what the server answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document (proto3 JSON names and enum names) for scripts.
    Json,
}

/// A failed call as the operator should read it: the message, the code and the reason.
fn rpc_error(status: Status) -> anyhow::Error {
    match error_reason(&status) {
        Some(reason) => anyhow::anyhow!("{} ({:?}, {reason})", status.message(), status.code()),
        None => anyhow::anyhow!("{} ({:?})", status.message(), status.code()),
    }
}

/// Parses `key=value` (metadata, labels).
fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(key_value("empty="), Ok(("empty".into(), String::new())));
        assert!(key_value("novalue").is_err());
        assert!(key_value("=value").is_err());
    }
}
