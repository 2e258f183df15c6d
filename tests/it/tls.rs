//! TLS and mutual TLS on the gRPC listener (spec §9), with certificates made in the test
//! (rcgen): plaintext refused, a client without a certificate refused under mutual TLS,
//! certificates rotated without a restart, and the plaintext health port for probes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leasehold::app::App;
use leasehold::client::{Client, TlsOptions};
use leasehold::config::Config;
use leasehold::proto as pb;
use leasehold::store::memory::MemoryStore;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A CA and what it signed, as PEM files in a fresh directory.
pub struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("leasehold-tls-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names` signed by this CA: (cert path, key path).
    pub fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(ToString::to_string).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    /// Client TLS trusting this CA, optionally with a client certificate.
    fn client_tls(&self, identity: Option<&(PathBuf, PathBuf)>) -> TlsOptions {
        TlsOptions {
            ca: Some(Self::read(&self.ca_path())),
            identity: identity.map(|(cert, key)| (Self::read(cert), Self::read(key))),
            domain: Some("localhost".into()),
        }
    }
}

/// A server on the memory store with `configure` applied, stopped when dropped.
pub struct TlsServer {
    pub port: u16,
    health_port: u16,
    _stop: oneshot::Sender<()>,
}

impl TlsServer {
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TlsServer {
        let mut config = crate::harness::test_config();
        let health_port = crate::harness::free_port();
        config.health_listen = Some(([127, 0, 0, 1], health_port).into());
        configure(&mut config);
        let store = Arc::new(MemoryStore::new(leasehold::app::store_policy(&config)));
        let app = App::with_store(config, store).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(app.run_until_stopped(listener, async {
            let _ = stopped.await;
        }));
        TlsServer {
            port,
            health_port,
            _stop: stop,
        }
    }

    /// One call over TLS: the queue's description, or the error.
    async fn call(&self, tls: Option<TlsOptions>) -> Result<(), String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{}", self.port);
        let client = Client::connect_with(url, tls.as_ref()).map_err(|error| error.to_string())?;
        let mut admin = client.admin();
        let call = admin.describe_queue(pb::DescribeQueueRequest { queue: "q".into() });
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(format!("{status:?}")),
            Err(_) => Err("timed out".into()),
        }
    }
}

pub fn with_tls(cert: &(PathBuf, PathBuf), client_ca: Option<PathBuf>) -> impl FnOnce(&mut Config) {
    let (cert, key) = cert.clone();
    move |config| {
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
        config.tls_client_ca = client_ca;
    }
}

#[tokio::test]
async fn a_tls_listener_serves_tls_and_refuses_plaintext() {
    let pki = Pki::new("server");
    let cert = pki.issue("server", &["localhost", "127.0.0.1"]);
    let server = TlsServer::start(with_tls(&cert, None)).await;

    assert_eq!(server.call(Some(pki.client_tls(None))).await, Ok(()));
    assert!(server.call(None).await.is_err(), "plaintext was served");
    let stranger = Pki::new("stranger");
    assert!(
        server.call(Some(stranger.client_tls(None))).await.is_err(),
        "a client trusting another CA connected"
    );
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate_from_its_ca() {
    let pki = Pki::new("mutual");
    let cert = pki.issue("server", &["localhost"]);
    let client_cert = pki.issue("client", &["worker-1"]);
    let server = TlsServer::start(with_tls(&cert, Some(pki.ca_path()))).await;

    assert_eq!(
        server.call(Some(pki.client_tls(Some(&client_cert)))).await,
        Ok(())
    );
    assert!(server.call(Some(pki.client_tls(None))).await.is_err());
    let other = Pki::new("other");
    let foreign = other.issue("client", &["worker-1"]);
    let mut tls = pki.client_tls(None);
    tls.identity = Some((Pki::read(&foreign.0), Pki::read(&foreign.1)));
    assert!(
        server.call(Some(tls)).await.is_err(),
        "a client certificate from another CA was accepted"
    );
}

/// The certificate files are replaced (as cert-manager renews a Secret): new connections get
/// the new certificate, with no restart.
#[tokio::test]
async fn rotated_certificates_are_served_without_a_restart() {
    let old = Pki::new("old");
    let cert = old.issue("server", &["localhost"]);
    let server = TlsServer::start(with_tls(&cert, None)).await;
    assert_eq!(server.call(Some(old.client_tls(None))).await, Ok(()));

    let new = Pki::new("new");
    let (new_cert, new_key) = new.issue("server", &["localhost"]);
    std::fs::copy(&new_key, &cert.1).unwrap();
    std::fs::copy(&new_cert, &cert.0).unwrap();

    let mut rotated = false;
    for _ in 0..50 {
        if server.call(Some(new.client_tls(None))).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the new certificate was never served");
    assert!(server.call(Some(old.client_tls(None))).await.is_err());
}

/// `--health-listen`: plaintext `grpc.health.v1` for the kubelet, beside a TLS-only listener
/// with tokens required; it serves health and nothing else.
#[tokio::test]
async fn the_health_port_answers_probes_in_plaintext() {
    let pki = Pki::new("health");
    let cert = pki.issue("server", &["localhost"]);
    let server = TlsServer::start(|config| {
        with_tls(&cert, None)(config);
        config.auth = leasehold::auth::AuthMode::Token;
    })
    .await;
    let endpoint =
        Channel::from_shared(format!("http://127.0.0.1:{}", server.health_port)).unwrap();
    let mut channel = None;
    for _ in 0..100 {
        if let Ok(connected) = endpoint.connect().await {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.expect("the health port never listened");

    let mut health = HealthClient::new(channel.clone());
    let mut status = None;
    for _ in 0..50 {
        let answer = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        if answer.status() == ServingStatus::Serving {
            status = Some(answer.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, Some(ServingStatus::Serving));
    let other = pb::task_service_client::TaskServiceClient::new(channel)
        .get_task(pb::GetTaskRequest {
            task_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), tonic::Code::Unimplemented);
}
