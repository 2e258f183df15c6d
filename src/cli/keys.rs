//! `leasehold key`: API keys (spec §9).

use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::operator::{CommonArgs, wire_duration};
use super::render;
use super::rpc_error;
use crate::proto as pb;

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key; its token is printed once and never again.
    Create(KeyCreateArgs),
    /// List API keys (never their tokens).
    List(KeyListArgs),
    /// Revoke an API key: every replica refuses it within seconds.
    Revoke(KeyRevokeArgs),
}

#[derive(Debug, Args)]
pub struct KeyCreateArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// A name for people (who holds it, what for).
    name: String,
    /// A scope: enqueue, read, manage, register or admin, optionally `:<queue glob>`
    /// (`enqueue:emails.*`). Repeat for several.
    #[arg(long = "scope", required = true)]
    scopes: Vec<String>,
    /// Expires after this long (`30d`); never when not given.
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct KeyListArgs {
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct KeyRevokeArgs {
    #[command(flatten)]
    common: CommonArgs,
    key_id: String,
}

impl KeyCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            KeyCommand::Create(args) => {
                let request = pb::CreateApiKeyRequest {
                    name: args.name.clone(),
                    scopes: args.scopes.clone(),
                    expires_in: wire_duration(args.expires_in)?,
                };
                let mut admin = args.common.server.client()?.admin();
                let created = admin
                    .create_api_key(request)
                    .await
                    .map_err(rpc_error)?
                    .into_inner();
                let key = created.api_key.unwrap_or_default();
                let mut json = render::api_key_json(&key);
                json["token"] = Value::String(created.token.clone());
                let text = format!(
                    "{}\ntoken (shown once): {}",
                    render::api_key_rows(std::slice::from_ref(&key)),
                    created.token
                );
                args.common.print(json, text);
                Ok(())
            }
            KeyCommand::List(args) => {
                let mut admin = args.common.server.client()?.admin();
                let keys = admin
                    .list_api_keys(pb::ListApiKeysRequest {})
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
                    .api_keys;
                let json = json!({
                    "apiKeys": keys.iter().map(render::api_key_json).collect::<Vec<_>>(),
                });
                args.common.print(json, render::api_key_rows(&keys));
                Ok(())
            }
            KeyCommand::Revoke(args) => {
                let request = pb::RevokeApiKeyRequest {
                    key_id: args.key_id.clone(),
                };
                let mut admin = args.common.server.client()?.admin();
                let key = admin
                    .revoke_api_key(request)
                    .await
                    .map_err(rpc_error)?
                    .into_inner()
                    .api_key
                    .unwrap_or_default();
                args.common.print(
                    render::api_key_json(&key),
                    render::api_key_rows(std::slice::from_ref(&key)),
                );
                Ok(())
            }
        }
    }
}
