//! Wiring: build the service from its configuration, then serve until told to stop.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::advisory::{Liveness, RedisLink};
use crate::auth::AuthMode;
use crate::config::{Config, StoreKind};
use crate::coordinator::{Coordinator, Settings};
use crate::grpc::{
    AdminApi, AuthLayer, ObserveLayer, ShedLayer, TaskApi, TypedErrorsLayer, WorkerApi,
};
use crate::proto as pb;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::task_service_server::TaskServiceServer;
use crate::proto::worker_service_server::WorkerServiceServer;
use crate::store::memory::MemoryStore;
use crate::store::{StorePolicy, SweepPolicy, TaskStore};
use crate::supervise::Background;
use crate::sweeper;
use crate::telemetry::metrics::Metrics;
use crate::tls::{ReloadingTls, TlsFiles};
use crate::web::console::Console;

/// How long an HTTP/2 keepalive ping may go unanswered before the connection is closed.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2 concurrent streams per connection (spec §10).
const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// Room for a message's other fields beyond the payload limit.
const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;
/// tonic's own default limit; never go below it.
const DEFAULT_MESSAGE_LIMIT_BYTES: usize = 4 * 1024 * 1024;

/// The health name a liveness probe asks for: SERVING from start-up to exit, whatever the
/// store or a drain does, so neither gets a pod restarted.
pub const LIVENESS_HEALTH_SERVICE: &str = "liveness";

/// Health names: "" is the whole server, the rest are the leasehold services. All follow
/// readiness: SERVING once the store answered, NOT_SERVING from the moment a drain begins.
const HEALTH_SERVICES: [&str; 4] = [
    "",
    <WorkerServiceServer<WorkerApi> as NamedService>::NAME,
    <TaskServiceServer<TaskApi> as NamedService>::NAME,
    <AdminServiceServer<AdminApi> as NamedService>::NAME,
];

/// How long shutdown waits for the background duties once the server stopped serving.
const BACKGROUND_STOP_GRACE: Duration = Duration::from_secs(5);

mod database;

use database::connect_postgres;
pub use database::{connect_options, for_pooler, postgres_store, route, store_policy};

/// A background duty, started afresh by its supervisor.
type BoxedDuty = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct App {
    config: Config,
    coordinator: Arc<Coordinator>,
}

impl App {
    /// Prepares the store: PostgreSQL when a database URL is configured (connecting and
    /// applying migrations, so a misconfigured replica never reports SERVING), else the
    /// embedded in-memory store.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let kind = config.store_kind().map_err(anyhow::Error::msg)?;
        let store: Arc<dyn TaskStore> = match (kind, config.database_url.as_deref()) {
            (StoreKind::Postgres, Some(database_url)) => {
                Arc::new(connect_postgres(database_url, &config).await?)
            }
            _ => {
                tracing::warn!(
                    "no DATABASE_URL: running on the embedded in-memory store; \
                     every task and runtime is lost when the process stops"
                );
                Arc::new(MemoryStore::new(store_policy(&config)))
            }
        };
        Self::with_store(config, store)
    }

    /// Builds the service on an already prepared store. Redis, when configured, is connected
    /// lazily: the service starts (degraded) without it.
    pub fn with_store(config: Config, store: Arc<dyn TaskStore>) -> anyhow::Result<App> {
        let settings = Settings {
            lease_duration: config.lease_duration,
            heartbeat_interval: config.heartbeat_interval,
            max_payload_bytes: config.max_payload_bytes,
            liveness_ttl: config.liveness_ttl,
            sweep: SweepPolicy {
                offline_after: config.offline_after + Liveness::record_lag(config.redis_timeout),
                interval: config.sweep_interval,
                dispatch_timeout: config.dispatch_timeout,
                pinned_orphan_grace: config.pinned_orphan_grace,
                batch_size: config.sweep_batch_size,
                retain_finished: Some(config.retain_finished).filter(|keep| !keep.is_zero()),
            },
            stream_keepalive: config.stream_keepalive,
            stream_poll_interval: config.stream_poll_interval,
            stream_claim_linger: config.stream_claim_linger,
            max_streams_per_runtime: config.max_streams_per_runtime,
        };
        warn_about_liveness_chain(&config);
        if config.auth == AuthMode::None && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "--auth none while listening beyond loopback: anyone who reaches this port can \
                 act as any worker and operator"
            );
        }
        if config.auth == AuthMode::Token && config.admin_token_file.is_none() {
            tracing::warn!(
                "--auth token without --admin-token-file: only API keys and runtime tokens can \
                 be used, and no API key can be created"
            );
        }
        let metrics = Metrics::new();
        let redis = config
            .redis_url
            .as_deref()
            .map(|url| {
                RedisLink::new(
                    url,
                    &config.redis_key_prefix,
                    config.redis_timeout,
                    metrics.clone(),
                )
            })
            .transpose()
            .context("invalid REDIS_URL")?
            .map(Arc::new);
        Ok(App {
            coordinator: Arc::new(Coordinator::new(
                store,
                settings,
                redis,
                (config.auth, config.admin_token_file.clone()),
                metrics,
            )),
            config,
        })
    }

    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    pub fn store_policy(&self) -> StorePolicy {
        store_policy(&self.config)
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down in order: health turns
    /// NOT_SERVING, the listener closes, and in-flight calls get `--shutdown-grace` to finish.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;
        health
            .set_service_status(LIVENESS_HEALTH_SERVICE, ServingStatus::Serving)
            .await;
        self.coordinator
            .ready()
            .await
            .context("the store did not answer")?;
        let stopping = CancellationToken::new();
        self.serve_http(&stopping).await?;
        let background = self.spawn_background(stopping.child_token()).await;
        set_health(&health, ServingStatus::Serving).await;
        tokio::spawn(drain_on_shutdown(
            shutdown,
            health,
            self.coordinator.draining().clone(),
            stopping.clone(),
        ));

        let address = listener.local_addr()?;
        // A payload at --max-payload-bytes must reach the handler, which then applies the
        // limit with a typed INVALID_FIELD error instead of a bare transport error.
        let message_limit = (self.config.max_payload_bytes + MESSAGE_OVERHEAD_BYTES)
            .max(DEFAULT_MESSAGE_LIMIT_BYTES);
        if let Some(health_address) = self.config.health_listen {
            serve_health_only(health_address, health_service.clone(), stopping.clone()).await?;
        }
        let router = Server::builder()
            // Idle connections stay open through proxies, and dead ones (whose claim streams
            // must give their claims back) are noticed.
            .http2_keepalive_interval(Some(self.config.stream_keepalive))
            .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
            // HTTP/2: at most this many concurrent streams per connection (tonic sets none).
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .layer(
                tower::ServiceBuilder::new()
                    .layer(ObserveLayer::new(self.coordinator.metrics().clone()))
                    .layer(TypedErrorsLayer)
                    .layer(ShedLayer::new(self.config.max_inflight_calls))
                    .layer(AuthLayer::new(self.coordinator.clone())),
            )
            .add_service(health_service)
            .add_service(reflection_v1()?)
            .add_service(reflection_v1alpha()?)
            .add_service(
                WorkerServiceServer::new(WorkerApi::new(self.coordinator.clone()))
                    .max_decoding_message_size(message_limit),
            )
            .add_service(
                TaskServiceServer::new(TaskApi::new(self.coordinator.clone()))
                    .max_decoding_message_size(message_limit),
            )
            .add_service(AdminServiceServer::new(AdminApi::new(
                self.coordinator.clone(),
            )));
        let stopped = stopping.clone().cancelled_owned();
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match self.tls()? {
                Some(tls) => {
                    let incoming = tls.incoming(listener, stopping.clone());
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
                }
                None => Box::pin(router.serve_with_incoming_shutdown(
                    // Without TCP_NODELAY, small responses wait on the peer's delayed ACK.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    stopped,
                )),
            };
        let tls = if self.config.tls_cert.is_some() {
            "TLS"
        } else {
            "plaintext"
        };
        tracing::info!(%address, tls, auth = ?self.config.auth, "leasehold serving");

        let grace = self.config.shutdown_grace;
        let grace_elapsed = async {
            stopping.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = server => served.context("gRPC server failed")?,
            () = grace_elapsed => {
                tracing::warn!(?grace, "shutdown grace elapsed; abandoning in-flight calls");
            }
        }
        // The duties finish what they were doing (a sweep in progress, the last signs of life)
        // before leadership is given up, so no sweep renews it afterwards.
        background.stop_within(BACKGROUND_STOP_GRACE).await;
        self.coordinator.step_down().await;
        tracing::info!("leasehold stopped");
        Ok(())
    }

    /// `--metrics-listen` (metrics alone) and `--http-listen` (the console and metrics).
    async fn serve_http(&self, stopping: &CancellationToken) -> anyhow::Result<()> {
        let metrics = || crate::web::metrics_routes(self.coordinator.metrics().clone());
        if let Some(address) = self.config.metrics_listen {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on --metrics-listen {address}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving metrics");
            crate::web::spawn(listener, metrics(), stopping.clone());
        }
        if let Some(address) = self.config.http_listen {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen on --http-listen {address}"))?;
            tracing::info!(address = %listener.local_addr()?, "serving the console");
            let console = Arc::new(Console::new(
                self.coordinator.clone(),
                self.config.console_session_ttl,
                self.config.console_secure_cookies,
            ));
            let routes = crate::web::console::routes(console).merge(metrics());
            crate::web::spawn(listener, routes, stopping.clone());
        }
        Ok(())
    }

    /// The listener's TLS, when --tls-cert and --tls-key are given.
    fn tls(&self) -> anyhow::Result<Option<Arc<ReloadingTls>>> {
        let (Some(cert), Some(key)) = (&self.config.tls_cert, &self.config.tls_key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.config.tls_client_ca.clone(),
        };
        Ok(Some(Arc::new(
            ReloadingTls::load(files).context("cannot load the TLS certificates")?,
        )))
    }

    /// The sweeper, the Redis watcher and the other duties: stopped and waited for with
    /// [`Background::stop_within`], or only asked to stop when the value is dropped (the server
    /// ended some other way).
    async fn spawn_background(&self, stop: CancellationToken) -> Background {
        let mut background = Background::new(stop, self.coordinator.metrics().clone());
        // Each duty is supervised: one that panics is started again (spec §10).
        let mut duty =
            |name: &'static str, run: fn(Arc<Coordinator>, CancellationToken) -> BoxedDuty| {
                let (coordinator, stop) =
                    (self.coordinator.clone(), background.stop_token().clone());
                background.supervise(name, move || run(coordinator.clone(), stop.clone()));
            };
        if let Some(redis) = self.coordinator.redis() {
            redis.connect_now().await;
            duty("redis_watch", |coordinator, stop| {
                Box::pin(async move {
                    if let Some(redis) = coordinator.redis() {
                        redis.watch(stop).await;
                    }
                })
            });
            duty("wakeup_relay", |coordinator, stop| {
                Box::pin(async move {
                    if let Some(redis) = coordinator.redis().cloned() {
                        coordinator.relay_wakeups(redis, stop).await;
                    }
                })
            });
        }
        duty("admin_token_watch", |coordinator, stop| {
            Box::pin(async move { coordinator.watch_admin_token(stop).await })
        });
        duty("signs_of_life", |coordinator, stop| {
            Box::pin(async move { coordinator.record_signs_of_life(stop).await })
        });
        duty("due_tasks", |coordinator, stop| {
            Box::pin(async move { coordinator.announce_due_tasks(stop).await })
        });
        let interval = self.config.sweep_interval;
        let (coordinator, stop_sweeper) =
            (self.coordinator.clone(), background.stop_token().clone());
        background.supervise("sweeper", move || {
            sweeper::run(coordinator.clone(), interval, stop_sweeper.clone())
        });
        background
    }
}

/// A runtime that only heartbeats is marked OFFLINE after `--offline-after` without one
/// (spec §6); with a suggested interval above half of it, a single lost heartbeat does that.
fn warn_about_liveness_chain(config: &Config) {
    if config.heartbeat_interval * 2 > config.offline_after {
        tracing::warn!(
            heartbeat_interval = ?config.heartbeat_interval,
            offline_after = ?config.offline_after,
            "the heartbeat interval is over half of --offline-after: one lost heartbeat gets a \
             runtime that only heartbeats marked OFFLINE"
        );
    }
}

/// `grpc.health.v1` alone, in plaintext, on its own port: the kubelet's gRPC probe speaks
/// neither TLS nor tokens (spec §9). Same health states as the main listener.
async fn serve_health_only<S>(
    address: std::net::SocketAddr,
    health: S,
    stopping: CancellationToken,
) -> anyhow::Result<()>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on --health-listen {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "health probes served in plaintext");
    let server = Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), stopping.cancelled_owned());
    tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::warn!(%error, "the health listener failed");
        }
    });
    Ok(())
}

/// The drain, in order: health NOT_SERVING (probes see it before the listener closes, so load
/// balancers stop routing here), `draining` on every claim stream (each then ends and gives
/// back its unstarted claims) and long-polls answered, then the listener closes while in-flight
/// calls get `--shutdown-grace`.
async fn drain_on_shutdown(
    shutdown: impl Future<Output = ()>,
    health: HealthReporter,
    draining: CancellationToken,
    stopping: CancellationToken,
) {
    shutdown.await;
    set_health(&health, ServingStatus::NotServing).await;
    draining.cancel();
    stopping.cancel();
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

fn reflection_v1() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    Ok(reflection_builder().build_v1()?)
}

fn reflection_v1alpha() -> anyhow::Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    Ok(reflection_builder().build_v1alpha()?)
}

/// Reflection describes the leasehold services and health (grpcurl needs no proto files).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}
