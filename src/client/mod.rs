//! The Rust client: a typed connection to a leasehold server ([`Client`]) and a [`Worker`] that
//! runs a [`Handler`] per claimed task and follows every rule of a well-behaved daemon.
//!
//! ```no_run
//! use leasehold::client::{Client, Handler, TaskContext, TaskError, Worker, WorkerConfig};
//!
//! struct Echo;
//!
//! #[async_trait::async_trait]
//! impl Handler for Echo {
//!     async fn run(&self, task: &TaskContext) -> Result<Vec<u8>, TaskError> {
//!         Ok(task.task().payload.clone())
//!     }
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect("http://127.0.0.1:50051")?;
//! let config = WorkerConfig::new("echo-1", ["emails"]).concurrency(4);
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Worker::new(client, config, Echo).run(shutdown).await?;
//! # Ok(())
//! # }
//! ```

mod backoff;
mod claiming;
mod handler;
mod lifecycle;
mod shared;
mod stream_writer;
mod task_run;
mod worker;
mod worker_config;

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::task_service_client::TaskServiceClient;
use crate::proto::worker_service_client::WorkerServiceClient;

pub use backoff::Backoff;
pub use handler::{Handler, TaskContext, TaskError};
pub use worker::Worker;
pub use worker_config::{ClaimMode, WorkerConfig};

/// What a boxed transport fails with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A transport failure. A named type rather than [`BoxError`] itself: the generated clients'
/// `Into<BoxError>` bound is then met for every lifetime, which spawned tasks need.
#[derive(Debug)]
pub struct TransportError(pub BoxError);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

/// The HTTP/2 service every client call goes through: a tonic [`Channel`] by default, or any
/// tower stack around one (retries, auth headers, fault injection in tests).
pub type Transport = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    TransportError,
>;

/// A connection to one leasehold server (or a load balancer in front of several).
/// Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    transport: Transport,
}

impl Client {
    /// Connects lazily to `url` (`http://host:port`): the first call dials, and a broken
    /// connection is re-dialled by the next call, so a worker may start before its server.
    pub fn connect(url: impl Into<String>) -> Result<Client, tonic::transport::Error> {
        Client::connect_with(url, None)
    }

    /// As [`Client::connect`], over TLS when `tls` is given (an `https://` URL).
    pub fn connect_with(
        url: impl Into<String>,
        tls: Option<&TlsOptions>,
    ) -> Result<Client, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.into())?;
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.config())?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            // Pings keep idle claim streams alive through proxies and reveal dead peers.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(Client::from_channel(endpoint.connect_lazy()))
    }

    pub fn from_channel(channel: Channel) -> Client {
        Client::from_transport(BoxCloneSyncService::new(
            channel.map_err(|error| TransportError(error.into())),
        ))
    }

    pub fn from_transport(transport: Transport) -> Client {
        Client { transport }
    }

    /// This connection, with every call carrying `authorization: Bearer <token>` (an API key,
    /// a runtime token or the admin token; spec §9). The header is marked sensitive, so it
    /// stays out of debug output.
    pub fn with_token(&self, token: &str) -> Result<Client, InvalidToken> {
        let mut value = http::HeaderValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        // Wrapping a client that had a token already: the newer one (outer) wins.
        let transport = self.transport.clone().map_request(
            move |mut request: http::Request<tonic::body::Body>| {
                request
                    .headers_mut()
                    .entry(http::header::AUTHORIZATION)
                    .or_insert_with(|| value.clone());
                request
            },
        );
        Ok(Client::from_transport(BoxCloneSyncService::new(transport)))
    }
}

/// TLS for a client (spec §9): the CA to trust (else the system's roots are not used: give
/// one), and for mutual TLS a certificate and key. All PEM.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    pub ca: Option<Vec<u8>>,
    /// (certificate chain, private key).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry, when not the URL's host.
    pub domain: Option<String>,
}

impl TlsOptions {
    /// Reads the PEM files.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> std::io::Result<TlsOptions> {
        Ok(TlsOptions {
            ca: ca.map(std::fs::read).transpose()?,
            identity: match identity {
                Some((cert, key)) => Some((std::fs::read(cert)?, std::fs::read(key)?)),
                None => None,
            },
            domain: None,
        })
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        config
    }
}

/// A token that cannot travel in a header (it holds control characters).
#[derive(Debug, thiserror::Error)]
#[error("the token holds characters a header cannot carry")]
pub struct InvalidToken;

/// The token the client commands and daemons use: `LEASEHOLD_TOKEN`, else the contents of the
/// file `token_file` names (a Kubernetes Secret), else none.
pub fn token_from(
    token: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> std::io::Result<Option<String>> {
    if let Some(token) = token.map(str::trim).filter(|token| !token.is_empty()) {
        return Ok(Some(token.to_owned()));
    }
    match token_file {
        Some(path) => Ok(Some(std::fs::read_to_string(path)?.trim().to_owned())),
        None => Ok(None),
    }
}

impl Client {
    pub fn worker(&self) -> WorkerServiceClient<Transport> {
        WorkerServiceClient::new(self.transport.clone())
    }

    pub fn tasks(&self) -> TaskServiceClient<Transport> {
        TaskServiceClient::new(self.transport.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Transport> {
        AdminServiceClient::new(self.transport.clone())
    }
}

/// True when the server revoked this credential: for a runtime token, another daemon
/// registered the same name and now holds the identity.
pub fn is_revoked(status: &Status) -> bool {
    error_reason(status).as_deref() == Some("CREDENTIALS_REVOKED")
}

/// The `google.rpc.ErrorInfo` reason of a leasehold error (`CLAIM_SUPERSEDED`,
/// `RUNTIME_NOT_FOUND`, …); `None` for errors that carry none (transport failures).
pub fn error_reason(status: &Status) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
}

/// True when the call may have failed for reasons unrelated to the request (the server or the
/// network), so the same call may be tried again. A transport failure surfaces as `UNKNOWN` or
/// `UNAVAILABLE`.
pub fn is_transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled
    )
}

/// True when the server refused a claim-token write because the claim is no longer this
/// worker's (superseded, expired, cancelled or already finished): the task is someone else's
/// business now.
pub fn is_claim_lost(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition | Code::AlreadyExists
    )
}
