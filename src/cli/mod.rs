//! The client subcommands of the `leasehold` binary: the `worker` daemon and the operator
//! commands (`task`, `queue`, `runtime`). Each talks to a server over gRPC with the SDK.

mod operator;
mod render;
mod worker_daemon;

use clap::{Args, ValueEnum};
use tonic::Status;

use crate::client::{Client, error_reason};

pub use operator::{KeyCommand, QueueCommand, RuntimeCommand, TaskCommand};
pub use worker_daemon::WorkerArgs;

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
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let client = Client::connect(self.server.clone())
            .map_err(|error| anyhow::anyhow!("bad --server {:?}: {error}", self.server))?;
        let token = crate::client::token_from(self.token.as_deref(), self.token_file.as_deref())
            .map_err(|error| anyhow::anyhow!("cannot read --token-file: {error}"))?;
        match token {
            Some(token) => Ok(client.with_token(&token)?),
            None => Ok(client),
        }
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
