//! TLS for the gRPC listener (spec §9), with rustls: `--tls-cert` / `--tls-key` make the
//! listener TLS-only, `--tls-client-ca` additionally requires a client certificate signed by
//! that CA (mutual TLS). The files are checked for changes at most once a second as
//! connections arrive, and a changed set is loaded for the next handshake, so rotated
//! certificates (cert-manager renewing a Secret) need no restart. A set that fails to load is
//! logged and the previous one stays in use.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for changes (on connection arrival, not on a timer).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A handshake that takes longer than this is dropped, so a silent client holds nothing.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them.
const ACCEPTED_BUFFER: usize = 64;

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert, &self.key].into_iter().chain(&self.client_ca)
    }

    /// When each file last changed, and its size: a different stamp means "load again".
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .map(|path| {
                let metadata = std::fs::metadata(path).ok()?;
                Some((metadata.modified().ok()?, metadata.len()))
            })
            .collect()
    }
}

/// The server's TLS configuration, loaded again when its files change.
pub struct ReloadingTls {
    files: TlsFiles,
    state: Mutex<Loaded>,
}

struct Loaded {
    acceptor: TlsAcceptor,
    stamp: Vec<Option<(SystemTime, u64)>>,
    checked_at: Instant,
}

impl ReloadingTls {
    /// Loads the files now: a server must not start with a configuration it cannot use.
    pub fn load(files: TlsFiles) -> anyhow::Result<ReloadingTls> {
        let stamp = files.stamp();
        let acceptor = TlsAcceptor::from(Arc::new(server_config(&files)?));
        Ok(ReloadingTls {
            files,
            state: Mutex::new(Loaded {
                acceptor,
                stamp,
                checked_at: Instant::now(),
            }),
        })
    }

    /// The acceptor for the next handshake.
    fn acceptor(&self) -> TlsAcceptor {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked_at.elapsed() >= CHECK_EVERY {
            state.checked_at = Instant::now();
            let stamp = self.files.stamp();
            if stamp != state.stamp {
                state.stamp = stamp;
                match server_config(&self.files) {
                    Ok(config) => {
                        state.acceptor = TlsAcceptor::from(Arc::new(config));
                        tracing::info!("TLS certificates changed on disk: loaded them");
                    }
                    Err(error) => tracing::warn!(
                        error = format!("{error:#}"),
                        "changed TLS files cannot be used; keeping the previous certificates"
                    ),
                }
            }
        }
        state.acceptor.clone()
    }

    /// Accepts connections on `listener` until `stop`, each handshaken in its own task; yields
    /// the TLS connections. A failed handshake (a plaintext client, a client without the
    /// required certificate) closes that connection and is logged at debug level.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (accepted, stream) = mpsc::channel(ACCEPTED_BUFFER);
        tokio::spawn(async move {
            loop {
                let connection = tokio::select! {
                    () = stop.cancelled() => return,
                    connection = listener.accept() => connection,
                };
                let Ok((tcp, peer)) = connection else {
                    continue;
                };
                // Small responses must not wait on the peer's delayed ACK.
                let _ = tcp.set_nodelay(true);
                let acceptor = self.acceptor();
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = accepted.send(Ok(tls)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(stream)
    }
}

fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("cannot read a private key from {}", files.key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read the client CA {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a usable pair")?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
